"""dlrm_jax: DLRM in JAX/Flax with sparse, sharded embedding tables."""

import setuptools

setuptools.setup(
    name='dlrm_jax',
    version='0.1.0',
    description=('DLRM recommendation model in JAX/Flax: sparse embedding '
                 'updates, sharded tables, Criteo pipelines.'),
    long_description=open('README.md').read() if __import__('os').path.exists(
        'README.md') else '',
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['dlrm_jax', 'dlrm_jax.*']),
    python_requires='>=3.11',
    # Lower bounds are the versions the tests ran with.
    install_requires=[
        'absl-py>=2.5.1',
        'array_record>=0.8.6',
        'etils[epath]>=1.15',
        'flatbuffers>=25.12',
        'flax>=0.12.8',
        'grain>=0.2.18',
        'importlib_resources>=7.1',
        'jax>=0.10.2',
        'matplotlib>=3.11',
        'ml-collections>=1.1',
        'numpy>=2.4',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        'pyarrow>=26.0',
        'tensorboardX>=2.6.5',
        'tensorflow-datasets>=4.9.10',
        'tqdm>=4.70',
    ],
    extras_require={
        'test': [
            'ipykernel>=7.4',
            'nbclient>=0.11',
            'nbformat>=5.11',
            'pytest>=9.2',
            'pytest-xdist>=3.8',
            'pyyaml>=6.0',
            'aiohttp>=3.14',  # tests/serve_test.py, benchmarks/serving.py
        ],
        'serve': [  # python -m dlrm_jax.serve (see its docstring: why)
            'aiohttp>=3.14',
        ],
        'torch': [  # dlrm_jax.convert reading/writing torch .pt state dicts
            'torch>=2.4',
        ],
        'notebooks': [
            'ipykernel>=7.4',
            'jupyter>=1.0',
        ],
        # NVIDIA GPUs: jax's own CUDA extras (CUDA wheels included). jaxlib
        # 0.10.2-0.11.0 have the GPU float32 scatter-add regression
        # (openxla/xla#46225), which dlrm_jax.gpu works around at start-up.
        'cuda': ['jax[cuda12]>=0.10.2'],
        'cuda12': ['jax[cuda12]>=0.10.2'],
        'cuda13': ['jax[cuda13]>=0.10.2'],
    },
)
