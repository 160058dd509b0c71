"""Metadata and dependencies are in setup.cfg. Here: the packages, with the dataset cards of the top-level
``datasets/`` folder (their one source) shipped as package data in ``finetune/cards/``, so a plain
``pip install .`` finds them too."""
from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["finetune", "finetune.*"]), "finetune.cards"],
    package_dir={"finetune.cards": "datasets"},
    package_data={"finetune.cards": ["*.yaml"]},
)
