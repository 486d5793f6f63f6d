"""Renaming state dicts between a Hugging Face layout and native keys, from a table of templates.

Each model family holds its key map as data (``"model.layers.{}.mlp.up_proj.weight" ->
"layers.{}.feed_forward.w3.weight"``, ``{}`` a layer index) and the rewrite of other layouts
of its checkpoints to the hub one; the renaming itself is here, with the types the family's
checkpoint adapter shares with omnilong.checkpoint.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

_LAYER_INDEX = re.compile(r"\.(\d+)\.")

Dim = tuple[int, str]  # a checkpoint tensor's dimension: (size, the config key or expression it comes from)


def map_key(key: str, table: dict[str, str]) -> str | None:
    """``key`` through ``table``: an exact entry first, else the template with its first index as ``{}``."""
    if key in table:
        return table[key]
    match = _LAYER_INDEX.search(key)
    if match is None:
        return None
    template = table.get(key[: match.start()] + ".{}." + key[match.end() :])
    return None if template is None else template.format(match.group(1))


@dataclass(frozen=True)
class KeyMap:
    """A family's key map.

    Args:
        name: the family, for messages.
        hf_to_native_table: hub key template -> native key template.
        to_hub_layout: one key of any layout the family's checkpoints use -> its hub name.
        is_vision_key: whether a native key names a vision-side tensor.
    """

    name: str
    hf_to_native_table: dict[str, str]
    to_hub_layout: Callable[[str], str]
    is_vision_key: Callable[[str], bool]
    native_to_hf_table: dict[str, str] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "native_to_hf_table", {v: k for k, v in self.hf_to_native_table.items()})

    def hf_to_native(
        self, hf_state_dict: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
        """Convert an HF state dict (any of the family's layouts) to native keys.

        Returns:
            ``(native_state_dict, vision_keys, unknown_keys)``: every converted tensor, the native
            names of the vision-side tensors among them (for a text-only model to leave out), and
            the names of keys that match nothing in the map.
        """
        native, vision, unknown = {}, [], []
        for key, tensor in hf_state_dict.items():
            native_key = map_key(self.to_hub_layout(key), self.hf_to_native_table)
            if native_key is None:
                unknown.append(key)
                continue
            native[native_key] = tensor
            if self.is_vision_key(native_key):
                vision.append(native_key)
        return native, vision, unknown

    def native_to_hf(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Convert native keys to the HF hub layout.

        Raises:
            KeyError: naming a native key that has no HF name.
        """
        out = {}
        for key, tensor in state_dict.items():
            hf_key = map_key(key, self.native_to_hf_table)
            if hf_key is None:
                raise KeyError(f"native key {key!r} has no Hugging Face name in the {self.name} key map")
            out[hf_key] = tensor
        return out
