"""Registry of feature encoders, so pipelines name an encoder instead of importing it.

Every stage that turns pixels into vectors (region workers, the feature store, the model's
inputs) asks for an encoder by name through :func:`create_encoder`. Keeping the choice a
string means a feature store can record which encoder (and which ``version``) produced it,
and a learned encoder can replace a built-in one without touching the callers.

Two kinds of encoder exist, told apart by ``scale``:

* :class:`PatchEncoder` (``scale == "patch"``) turns a batch of ``patch_px`` x ``patch_px``
  RGB patches read at ``mpp`` microns per pixel into ``dim``-long float32 vectors, and offers
  a :meth:`~PatchEncoder.query_bank` used by :mod:`omero_hwsi.features.selection` to rank
  patches by relevance without labels.
* :class:`RegionEncoder` (``scale == "region"``) turns a 64 x 64 thumbnail of a whole region
  (16 x 16 patches, each area-averaged to 4 x 4 pixels) plus the per-patch tissue fractions
  into one vector describing the region's layout.

The built-in encoders (``hed_texture`` and ``layout``, in
:mod:`omero_hwsi.features.encoders.builtin`) need no weights and are registered the first
time the registry is queried; the import is deferred because the built-in module itself
imports :func:`register_encoder` from here.

Learned encoders (loaded from a local checkpoint)
-------------------------------------------------
Learned encoders (e.g. a torch ViT for patches, or a CLIP-style model with a text tower)
plug into the same registry. To keep the base install free of torch, their module must
not be imported by this one; it registers itself when the worker extra imports it. The
contract such an encoder must follow:

* The factory is registered with ``@register_encoder("name")`` (pass ``scale=`` or give the
  factory a ``scale`` attribute so :func:`list_encoders` can filter without loading it) and
  is called as ``factory(checkpoint: Path, **options)``. ``checkpoint`` is a local file or
  folder; the factory loads it with local files only (``local_files_only=True``, no hub or
  network access, no downloads) and raises
  :class:`~omero_hwsi.errors.ModelFileNotFoundError` when it is missing and
  :class:`~omero_hwsi.errors.CheckpointMismatchError` when its keys or shapes are wrong.
* The returned object exposes the same attributes as the built-ins: ``encoder_id`` (the
  registry name), ``version`` (change it whenever outputs change, it keys feature stores),
  ``dim``, ``scale`` and, for patch encoders, ``mpp``, ``patch_px`` and ``has_text_tower``.
* ``encode`` takes the same uint8 arrays and returns float32 ``(B, dim)`` arrays on the CPU
  (a numpy array, never a tensor), deterministically in eval mode.
* ``query_bank()`` returns ``(names, vectors)`` with ``vectors`` of shape ``(Q, dim)`` in
  the same embedding space as ``encode``. An encoder with a text tower sets
  ``has_text_tower = True`` and embeds its text prompts (e.g. ``"tumour nuclei"``) with it;
  one without a text tower returns prototype descriptors instead, as ``hed_texture`` does.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from omero_hwsi._types import FloatArray, RGBArray
from omero_hwsi.errors import UnknownEncoderError

__all__ = [
    "PatchEncoder",
    "RegionEncoder",
    "create_encoder",
    "is_encoder",
    "list_encoders",
    "register_encoder",
]

_BUILTIN_MODULE = "omero_hwsi.features.encoders.builtin"
_SCALES = ("patch", "region")

F = TypeVar("F", bound=Callable[..., Any])


@runtime_checkable
class PatchEncoder(Protocol):
    """Encodes fixed-size RGB patches into vectors; see the module docstring for the contract."""

    encoder_id: str
    version: str
    dim: int
    mpp: float
    patch_px: int
    scale: Literal["patch"]
    has_text_tower: bool

    def encode(self, patches: RGBArray) -> FloatArray:
        """Map ``(B, patch_px, patch_px, 3)`` uint8 patches to ``(B, dim)`` float32 vectors."""
        ...

    def query_bank(self) -> tuple[tuple[str, ...], FloatArray]:
        """Return names and ``(Q, dim)`` vectors used to rank patches by relevance."""
        ...


@runtime_checkable
class RegionEncoder(Protocol):
    """Encodes a region thumbnail plus its tissue grid into one vector per region."""

    encoder_id: str
    version: str
    dim: int
    scale: Literal["region"]

    def encode(self, pictures: RGBArray, tissue: FloatArray) -> FloatArray:
        """Map ``(B, 64, 64, 3)`` uint8 pictures and ``(B, 16, 16)`` tissue to ``(B, dim)``."""
        ...


class _Entry:
    """A registered factory and the scale it produces, when known without calling it."""

    __slots__ = ("factory", "scale")

    def __init__(self, factory: Callable[..., Any], scale: str | None) -> None:
        self.factory = factory
        self.scale = scale


_REGISTRY: dict[str, _Entry] = {}
_LOCK = threading.RLock()
_builtins_loaded = False


def _ensure_builtins() -> None:
    """Import the built-in encoders once; they register themselves on import."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    with _LOCK:
        if _builtins_loaded:
            return
        # Set first: the import below re-enters register_encoder, never this function.
        _builtins_loaded = True
        try:
            importlib.import_module(_BUILTIN_MODULE)
        except BaseException:
            _builtins_loaded = False
            raise


def _same_factory(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """Whether two factories are the same definition (a module reload makes new objects)."""
    if a is b:
        return True

    def key(f: Callable[..., Any]) -> tuple[object, object]:
        return getattr(f, "__module__", None), getattr(f, "__qualname__", None)

    return key(a) == key(b) and key(a) != (None, None)


def register_encoder(
    name: str, *, scale: Literal["patch", "region"] | None = None
) -> Callable[[F], F]:
    """Register an encoder factory under ``name``; use as a decorator.

    The factory is any callable ``(**kwargs) -> PatchEncoder | RegionEncoder``; an encoder
    class whose constructor takes the options works too. Registering a *different* factory
    under a taken name is refused, so two plugins cannot silently shadow each other;
    re-registering the same definition (e.g. after a module reload) replaces it.

    Args:
        name: The registry name, stored in feature stores; non-empty, no whitespace.
        scale: ``"patch"`` or ``"region"``. If omitted, the factory's ``scale`` attribute is
            used (encoder classes have one), else the scale is learnt the first time the
            encoder is created. :func:`list_encoders` can only filter on a known scale.

    Returns:
        A decorator that registers the factory and returns it unchanged.

    Raises:
        ValueError: ``name`` is malformed, ``scale`` is not a known scale, or ``name`` is
            already taken by another factory.
        TypeError: The decorated object is not callable.
    """
    if (
        not isinstance(name, str)
        or not name
        or name != name.strip()
        or any(ch.isspace() for ch in name)
    ):
        raise ValueError(f"encoder name must be a non-empty string without spaces, got {name!r}")
    if scale is not None and scale not in _SCALES:
        raise ValueError(f"encoder scale must be one of {', '.join(_SCALES)}, got {scale!r}")

    def decorator(factory: F) -> F:
        if not callable(factory):
            raise TypeError(f"encoder factory for {name!r} is not callable: {factory!r}")
        known_scale = scale
        if known_scale is None:
            attr = getattr(factory, "scale", None)
            known_scale = attr if attr in _SCALES else None
        with _LOCK:
            old = _REGISTRY.get(name)
            if old is not None and not _same_factory(old.factory, factory):
                raise ValueError(
                    f"encoder name {name!r} is already registered by {old.factory!r}; "
                    "choose another name"
                )
            _REGISTRY[name] = _Entry(factory, known_scale)
        return factory

    return decorator


def create_encoder(name: str, **kwargs: Any) -> PatchEncoder | RegionEncoder:
    """Build the encoder registered as ``name``, passing ``kwargs`` to its factory.

    Args:
        name: A registry name, e.g. ``"hed_texture"`` or ``"layout"``.
        **kwargs: Options for the factory (learned encoders take ``checkpoint``).

    Returns:
        The encoder instance.

    Raises:
        UnknownEncoderError: No encoder has that name; the message lists the known names.
        TypeError: The factory returned something without a valid ``scale`` and ``encode``.
    """
    _ensure_builtins()
    with _LOCK:
        entry = _REGISTRY.get(name)
        known = sorted(_REGISTRY)
    if entry is None:
        raise UnknownEncoderError(
            f"unknown encoder {name!r}; known: {', '.join(known) if known else '(none)'}"
        )
    encoder = entry.factory(**kwargs)
    enc_scale = getattr(encoder, "scale", None)
    if enc_scale not in _SCALES or not callable(getattr(encoder, "encode", None)):
        raise TypeError(
            f"encoder factory {name!r} returned {type(encoder).__name__}, which lacks a "
            f"'scale' in ({', '.join(_SCALES)}) or an 'encode' method"
        )
    if entry.scale is None:
        entry.scale = enc_scale  # learnt now, so list_encoders(scale) can include it
    return encoder  # type: ignore[no-any-return]


def list_encoders(scale: str | None = None) -> list[str]:
    """Return the registered names, sorted, optionally only those of one scale.

    Args:
        scale: ``"patch"``, ``"region"`` or ``None`` for all. An encoder whose scale is not
            yet known (see :func:`register_encoder`) is listed only when ``scale`` is None.

    Raises:
        ValueError: ``scale`` is not ``None``, ``"patch"`` or ``"region"``.
    """
    if scale is not None and scale not in _SCALES:
        raise ValueError(f"scale must be one of {', '.join(_SCALES)} or None, got {scale!r}")
    _ensure_builtins()
    with _LOCK:
        return sorted(n for n, e in _REGISTRY.items() if scale is None or e.scale == scale)


def is_encoder(name: str) -> bool:
    """Whether ``name`` is a registered encoder (built-ins included)."""
    _ensure_builtins()
    with _LOCK:
        return name in _REGISTRY
