from setuptools import find_packages, setup

setup(
    name="megatron_ted",
    version="0.1.0",
    description="GPT Mixture-of-Experts pretraining with tensor x expert x data parallelism (DeepSpeed-TED)",
    packages=find_packages(include=["megatron_ted", "megatron_ted.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "sentencepiece",
        "numpy",
    ],
    extras_require={"test": ["pytest", "tensorboard", "transformers>=5", "safetensors"], "tensorboard": ["tensorboard"],
                    "hf": ["transformers>=5", "safetensors"]},
)
