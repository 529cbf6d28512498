"""What an adapter is: its rank, where it goes, its token and the base model it was made for."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

from ...core.errors import ComcatError

FORMAT = "comcat-adapter/1"
TARGETS = ("self", "cross")
STREAMS = ("image", "context", "both")  # joint attention (SD3): which stream's queries the adapter changes
MAX_RANK = 64  # per head; a concept needs 1-4


@dataclass
class AdapterConfig:
    """rank: r columns per head for each of q', k', v'; targets: self- and/or cross-attention;
    scale: the default strength alpha; token: the concept's word in prompts; base_model: the
    pipeline it was trained on (a name), fingerprint: its attention shapes (checked at load);
    stream: in joint attention (SD3), the image stream's queries (self: to image tokens, cross: to
    context tokens), the context stream's, or both (comcat/customization/adapter/joint.py);
    shared_basis: the heads of an attention share one rank-wide basis per side, each head mixing it
    with its own rank x rank cores (layer.SharedHeadLowRank): a file the size of a rank-`rank` LoRA
    on models with many heads (SDXL, SD3, Flux), instead of heads x that."""

    rank: int = 2
    targets: tuple = TARGETS
    scale: float = 1.0
    token: str = "V*"
    base_model: str = ""
    fingerprint: str = ""
    token_embedding: bool = False  # the file also holds a learned embedding for `token`
    stream: str = "image"  # joint attention only (SD3): image, context or both streams
    shared_basis: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not 0 < self.rank <= MAX_RANK:
            raise ComcatError(
                f"adapter rank must be a positive integer up to {MAX_RANK}, got {self.rank!r} "
                "(1-4 is what a concept needs)"
            )
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ComcatError(f"adapter targets must be among {TARGETS}, got {list(self.targets)}")
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not math.isfinite(self.scale):
            raise ComcatError(f"adapter scale must be a finite number, got {self.scale!r}")
        if not isinstance(self.shared_basis, bool):
            raise ComcatError(f"adapter shared_basis must be true or false, got {self.shared_basis!r}")
        if self.stream not in STREAMS:
            raise ComcatError(f"adapter stream must be one of {', '.join(STREAMS)}, got {self.stream!r}")
        if not isinstance(self.token, str) or not self.token or any(c.isspace() for c in self.token):
            raise ComcatError(f"the concept token must be one word without spaces, got {self.token!r}")

    def to_metadata(self) -> dict[str, str]:
        """safetensors metadata (str -> str)."""
        return {"format": FORMAT, "config": json.dumps(asdict(self))}

    @classmethod
    def from_metadata(cls, meta: dict[str, str] | None, where: str) -> "AdapterConfig":
        """The config stored in a file's metadata: valid JSON, known keys, plain values, in bounds."""
        if not meta or meta.get("format") != FORMAT:
            raise ComcatError(f"{where} is not a comcat adapter file (no {FORMAT} metadata)")
        try:
            stored = json.loads(meta.get("config", ""))
        except json.JSONDecodeError:
            stored = None
        known = {f.name for f in fields(cls)}
        plain = (
            isinstance(stored, dict)
            and isinstance(stored.get("targets", ()), (list, tuple))
            and all(isinstance(stored.get(k, ""), str) for k in ("token", "base_model", "fingerprint", "stream"))
            and isinstance(stored.get("extra", {}), dict)
        )
        if not plain or set(stored) - known:
            raise ComcatError(f"{where} has invalid adapter metadata: save the adapter again with comcat")
        return cls(**stored)
