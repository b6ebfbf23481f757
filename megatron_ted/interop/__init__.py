"""Models in and out: Hugging Face import and export (hf_config, hf_export, hf_weights, hf_io)
and sparse upcycling of a dense checkpoint into an MoE (upcycle)."""
