"""Which layer implementation Megatron-Core builds: `local` or `transformer_engine`.

The choice is explicit (`--transformer-impl`, default `local`) and made once per process, like
the device: an image that happens to ship Transformer Engine (every NGC PyTorch image) must
not switch the trainer and the tools to another module tree, other checkpoint keys and other
kernels behind the user's back. `architectures.transformer_config` copies the choice into
Megatron's `TransformerConfig.transformer_impl`, the layer specs read it from there, and
checkpoints record it (`CheckpointInfo.extra['transformer_impl']`).

Apex never changes what `local` builds: our specs use torch norms (Apex's FusedLayerNorm
asserts LayerNorm-only and would crash every RMSNorm model).

The local implementation's core attention is chosen the same way (`--attention-backend`):
`sdpa` (default; `models.sdpa_attention`, PyTorch's flash / memory-efficient kernels) or
`local` (Megatron's `DotProductAttention`, which materialises the s x s scores). Neither has
parameters, so the choice is not recorded in checkpoints; transformer_engine always uses TE's
attention.
"""

from __future__ import annotations

TRANSFORMER_IMPLS = ("local", "transformer_engine")
DEFAULT = "local"
ATTENTION_BACKENDS = ("sdpa", "local")
DEFAULT_ATTENTION = "sdpa"

_SELECTED = DEFAULT
_ATTENTION = DEFAULT_ATTENTION


def transformer_engine_available() -> bool:
    """Whether Transformer Engine imports in this environment."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def check(name: str) -> str:
    """`name` if it is a usable implementation here; ValueError (one line, with the fix)
    otherwise."""
    if name not in TRANSFORMER_IMPLS:
        raise ValueError(f"--transformer-impl {name!r}: choose one of "
                         f"{', '.join(TRANSFORMER_IMPLS)}")
    if name == "transformer_engine" and not transformer_engine_available():
        raise ValueError("--transformer-impl transformer_engine but Transformer Engine does not "
                         "import here: use an image with TE (docker/Dockerfile) or pass "
                         "--transformer-impl local")
    return name


def select(name: str) -> str:
    """Make `name` this process's implementation (entry points call it from their flag)."""
    global _SELECTED
    _SELECTED = check(name)
    return _SELECTED


def current() -> str:
    """The implementation models of this process are built with (default `local`)."""
    return _SELECTED


def select_attention(name: str) -> str:
    """Make `name` (sdpa | local) this process's core attention for the local implementation;
    ValueError (one line) for another name."""
    global _ATTENTION
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend {name!r}: choose one of "
                         f"{', '.join(ATTENTION_BACKENDS)}")
    _ATTENTION = name
    return _ATTENTION


def attention_backend() -> str:
    """The core attention local-implementation models of this process are built with."""
    return _ATTENTION
