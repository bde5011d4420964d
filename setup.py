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
    install_requires=[
        'absl-py>=2.1',
        'array_record>=0.8',
        'etils[epath]>=1.7',
        'flatbuffers>=24.3',
        'flax>=0.12',
        'grain>=0.2.12',
        'importlib_resources>=6.0',
        'jax>=0.8',
        'matplotlib>=3.8',
        'ml-collections>=1.0',
        'numpy>=2.0',
        'optax>=0.2.5',
        'orbax-checkpoint>=0.11',
        'pyarrow>=17',
        'tensorboardX>=2.6',
        'tensorflow-datasets>=4.9.7',
        'tqdm>=4.60',
    ],
    extras_require={
        'test': [
            'ipykernel>=6.29',
            'nbclient>=0.10',
            'nbformat>=5.10',
            'pytest>=8',
            'pytest-xdist>=3',
            'pyyaml>=6',
        ],
        'notebooks': [
            'ipykernel>=6.29',
            'jupyter>=1.0',
        ],
    },
)
