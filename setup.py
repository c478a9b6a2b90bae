from setuptools import find_packages, setup

setup(
    name="compress",
    version="0.1.0",
    description="Depth pruning (ShortGPT BI layer removal) + quantization for Hugging Face causal LMs, "
                "with evaluation after every stage and loadable checkpoints",
    packages=find_packages(include=["compress", "compress.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<2.15",
        "transformers>=5.0,<6",
        "accelerate>=1.0,<2",  # device_map: multi-GPU and CPU offload
        "safetensors>=0.4.3,<1",
        "pydantic>=2.7,<3",
        "pyyaml>=6.0,<7",
        "click>=8.1,<9",
        "tqdm>=4.66,<5",
        "matplotlib>=3.8,<4",
        "numpy>=1.26,<3",
        "datasets>=3.0,<6",  # imported only when a recipe names a hub dataset
    ],
    extras_require={
        "quant": ["bitsandbytes>=0.49,<0.51"],  # stage bnb4 (CUDA, and CPU since 0.48)
        # stage gptq: GPTQModel 7.6.0 is the last release for torch < 2.14 (it pins numpy 2.2.6)
        "gptq": ["gptqmodel==7.6.0", "optimum>=2,<3"],
        # evaluate.tasks / `compress eval --tasks`: lm-evaluation-harness's own task code
        "tasks": ["lm-eval==0.4.13"],
        # `compress export --format gguf`, `verify --engine llamacpp`: llama.cpp's bindings (built from the sdist)
        # and the converter's tokenizer import; the converter itself and llama-imatrix come from the same
        # sdist through `bash scripts/gguf-env.sh`, which also builds this wheel once and caches it
        "gguf": ["llama-cpp-python==0.3.36", "sentencepiece==0.2.3"],
        # stage heal, method lora: LoRA adapters merged back into the weights
        "heal": ["peft>=0.21,<0.22"],
        # `compress sweep --executor ray`: one Ray task per node of the sweep's tree
        "ray": ["ray>=2.60,<2.61"],
        # lm-eval: the MMLU parity and task tests run its own scoring code (offline, local data)
        "test": ["pytest>=8,<10", "hypothesis>=6.100,<7", "lm-eval==0.4.13", "bitsandbytes>=0.49,<0.51",
                 "gptqmodel==7.6.0", "optimum>=2,<3", "peft>=0.21,<0.22", "ray>=2.60,<2.61"],
    },
    entry_points={"console_scripts": ["compress=compress.cli:main"]},
)
