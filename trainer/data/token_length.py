"""How a caption becomes SDXL text-encoder input: kohya's ``max_token_length`` or ComfyUI's own chunking.

kohya (library/strategy_sdxl.SdxlTokenizeStrategy + strategy_base._get_input_ids, SdxlTextEncodingStrategy.
_get_hidden_states_sdxl) encodes a caption as follows:

* ``max_token_length`` unset (kohya's default): ONE row of 77 = BOS + the first 75 tokens + EOS + padding; longer
  captions are TRUNCATED. The context is 77 long.
* 150 / 225: the caption is tokenized to 152 / 227 (BOS + up to 150 / 225 tokens + EOS + padding), then re-chunked
  into 2 / 3 rows of BOS + 75 tokens + the last position. A row that ends mid-text gets EOS as its last token; a row
  that starts with padding gets EOS as its first token (CLIP-G, whose pad id is 0, only). Each row goes through the
  encoder separately; the context is stitched back from the BOS of row 0, positions 1..75 of every row and the last
  position of the last row: 152 / 227 long. The pooled CLIP-G output is the first row's.
* ComfyUI chunking (what CLIPTextEncode does at inference): any length, in 77-token rows, context 77 x rows.

Row building and the stitch are pure functions here; trainer/cache/text.py runs them through ComfyUI's CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass

ROW = 77  # CLIP's context: BOS + 75 tokens + EOS
TOKENS_PER_ROW = ROW - 2
KOHYA_MAX_TOKEN_LENGTHS = (None, 150, 225)  # kohya's --max_token_length choices (None = 75)

#: the Cache Text node's choices, in order; the first is kohya's default
CHOICES = ("75", "150", "225", "ComfyUI chunking")
COMFYUI_CHUNKING = "ComfyUI chunking"


@dataclass(frozen=True)
class TokenLength:
    """How captions are tokenized and encoded.

    ``max_token_length``: kohya's --max_token_length: None (75 tokens, longer captions truncated), 150 or 225.
    ``comfyui_chunking``: encode as ComfyUI's CLIPTextEncode does instead (any length, 77-token chunks); kohya has no
    such mode, and ``max_token_length`` must then be None.
    """

    max_token_length: int | None = None
    comfyui_chunking: bool = False

    def __post_init__(self) -> None:
        if self.max_token_length == TOKENS_PER_ROW:  # 75 is kohya's default, which kohya spells None
            object.__setattr__(self, "max_token_length", None)
        if self.max_token_length not in KOHYA_MAX_TOKEN_LENGTHS:
            raise ValueError(
                f"max_token_length must be 75 (kohya's default), 150 or 225 (kohya's choices), got "
                f"{self.max_token_length!r}"
            )
        if self.comfyui_chunking and self.max_token_length is not None:
            raise ValueError("ComfyUI chunking has no max_token_length; leave it at kohya's default")

    @classmethod
    def from_choice(cls, choice: str) -> TokenLength:
        """The Cache Text node's widget value ("75", "150", "225", "ComfyUI chunking")."""
        if choice == COMFYUI_CHUNKING:
            return cls(comfyui_chunking=True)
        if choice not in CHOICES:
            raise ValueError(f"max_token_length must be one of {list(CHOICES)}, got {choice!r}")
        return cls(int(choice))

    @property
    def choice(self) -> str:
        """The widget value that gives this setting."""
        if self.comfyui_chunking:
            return COMFYUI_CHUNKING
        return str(self.max_token_length or TOKENS_PER_ROW)

    @property
    def limit(self) -> int | None:
        """The most caption tokens that are encoded (None: all, ComfyUI chunking)."""
        return None if self.comfyui_chunking else self.max_token_length or TOKENS_PER_ROW

    @property
    def rows(self) -> int:
        """Encoder rows per caption in kohya's modes."""
        return (self.max_token_length or TOKENS_PER_ROW) // TOKENS_PER_ROW

    def describe(self) -> str:
        if self.comfyui_chunking:
            return "ComfyUI chunking (any length, 77-token chunks, context 77 x chunks)"
        if self.max_token_length is None:
            return "kohya max_token_length 75 (default): longer captions are truncated, context 77"
        return f"kohya max_token_length {self.max_token_length}: context {self.max_token_length + 2}"


def kohya_token_rows(content: list[int], bos: int, eos: int, pad: int, max_token_length: int | None) -> list[list[int]]:
    """kohya's input_ids rows (each 77 long) for a caption's tokens ``content`` (without BOS/EOS, untruncated).

    ``pad``: the tokenizer's pad id (CLIP-L pads with EOS; kohya sets CLIP-G's pad id to 0).
    """
    length = (max_token_length or TOKENS_PER_ROW) + 2
    ids = [bos, *content[: length - 2], eos]
    ids += [pad] * (length - len(ids))
    if max_token_length is None:
        return [ids]
    rows = []
    for start in range(1, length - ROW + 2, TOKENS_PER_ROW):
        row = [ids[0], *ids[start : start + TOKENS_PER_ROW], ids[-1]]
        if pad != eos:  # SDXL / SD2 tokenizers (kohya's "v2" branch); CLIP-L rows are kept as they are
            if row[-2] != eos and row[-2] != pad:
                row[-1] = eos  # the row ends mid-text
            if row[1] == pad:
                row[1] = eos  # the row starts with padding: <BOS> <EOS> <PAD> ...
        rows.append(row)
    return rows


def stitched_positions(rows: int) -> list[tuple[int, int]]:
    """(row, position) of each context vector kohya keeps: BOS of row 0, 1..75 of every row, the last position."""
    if rows == 1:
        return [(0, p) for p in range(ROW)]
    kept = [(0, 0)]
    for r in range(rows):
        kept.extend((r, p) for p in range(1, ROW - 1))
    kept.append((rows - 1, ROW - 1))
    return kept


def stitched_indices(rows: int) -> list[int]:
    """``stitched_positions`` as indices into the rows' outputs concatenated along the token axis (77 x rows)."""
    return [r * ROW + p for r, p in stitched_positions(rows)]
