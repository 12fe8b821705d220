"""What a model that reads images needs beside its tokenizer: the processor's image side.

A model folder with a processor (`processor_config.json` or `preprocessor_config.json`, as Gemma 3 4B
and up, Qwen2-VL / Qwen2.5-VL and SmolVLM (Idefics3) ship it) reads images. Its chat template writes one
marker per image part (Gemma 3: `<start_of_image>`; Qwen2-VL: `<|image_pad|>` between `<|vision_start|>`
and `<|vision_end|>`; Idefics3: `<image>`); the processor replaces each marker with the image's tokens
(Gemma 3: a fixed sequence of soft tokens; Qwen2-VL: one `<|image_pad|>` per 2x2 merged patch, so as many
as the image's size gives; Idefics3: the `<image>` tokens of each tile the image is split into, by its
size, then of the whole image) and turns each image into the model's pixel inputs. `ImageInputs` does both for the data
pipeline and the batches, exactly as the processor does at inference: the text is expanded before it
is tokenized, the pixels come from the processor's own image processor.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ImageInputs:
    """A model's image side: the marker its template writes per image, the tokens that replace it (`tokens_of`:
    an image's height and width -> its text), the id of the tokens the vision features
    take the place of, the image processor, the name under which the model takes where the image tokens are
    (`type_ids`; None for a model that finds them itself, Idefics3), and whether the model computes its positions
    itself from the tokens and the images' grids (`rope_from_images`: Qwen2-VL's 3-D M-RoPE; a batch then carries
    no position_ids)."""

    marker: str
    tokens_of: Callable[[int, int], str]
    image_token_id: int
    image_processor: object
    type_ids: str | None = "token_type_ids"
    rope_from_images: bool = False
    sized: bool = False  # whether an image's tokens depend on the image (its size): Qwen2-VL's do, Gemma 3's do not
    settings: str = ""  # what else changes the tokens an image becomes (for the data cache's key)
    # The token each image's tokens hold once (Idefics3's `<global-img>`: an image is several runs of `<image>`, one
    # per tile); None where each image is one run of the image token.
    once_per_image: int | None = None
    # The dimension along which the pixel inputs of several images join: 0 where each output holds one entry per
    # image (Gemma 3's pixels, Qwen2-VL's patches), 1 for Idefics3's [1, tiles, channels, height, width].
    images_dim: int = 0

    def expand(self, text: str, images: Sequence[bytes]) -> str:
        """A rendered conversation with its image markers replaced, in order, by the tokens of `images` (the
        first ones of a conversation: a rendering of its beginning shows those its markers stand for)."""
        parts = text.split(self.marker)
        if len(parts) == 1:
            return text
        shown = len(parts) - 1
        if self.sized and len(images) < shown:
            raise ValueError(f"the text holds {shown} image markers and {len(images)} images were given")
        tokens = [self._tokens_of_image(data) for data in images[:shown]] if self.sized else None
        out = [parts[0]]
        for i, part in enumerate(parts[1:]):
            out += [tokens[i] if tokens else self.tokens_of(0, 0), part]
        return "".join(out)

    def collapse(self, text: str, images: Sequence[bytes], shown: str) -> str:
        """A text `expand` gave (a decoded prompt) with each image's tokens, in order, replaced by `shown`: the
        template's text as a person reads it, not the hundreds of tokens an image becomes."""
        out, start = [], 0
        for data in images:
            tokens = self._tokens_of_image(data) if self.sized else self.tokens_of(0, 0)
            at = text.find(tokens, start)
            if at < 0:  # a decoding that does not give back the expanded text: the rest shown as it decodes
                break
            out += [text[start:at], shown]
            start = at + len(tokens)
        return "".join(out) + text[start:]

    def refusal(self, data: bytes) -> str | None:
        """What the image processor says against an image it cannot take (Qwen2-VL's: a side over 200 times the
        other), None where it takes it. An image whose tokens depend on it is sized here as `expand` sizes it; the
        others' processors (Gemma 3's: a resize to its square) take any image."""
        if not self.sized:
            return None
        try:
            self._tokens_of_image(data)
        except ValueError as err:
            return str(err)
        return None

    def _tokens_of_image(self, data: bytes) -> str:
        """The tokens of an image whose tokens depend on its size, from the size its file's header gives, upright
        (an EXIF rotation by a quarter turn swaps the sides, as `_processed` loads the image): the pixels are
        decoded once, for the model's inputs (`_processed`), not for counting tokens."""
        from PIL import Image

        with Image.open(io.BytesIO(data)) as picture:
            width, height = picture.size
            if picture.getexif().get(_ORIENTATION) in _QUARTER_TURNS:
                width, height = height, width
        return self.tokens_of(height, width)

    def _processed(self, images: Sequence[bytes]) -> dict:
        """The image processor's outputs for `images`, in order. Each image is decoded and processed alone and only
        its outputs (the model's size) kept: a decoded image is up to Pillow's pixel limit, ~270 MB, and the
        images of a request or a batch decoded together would take that many times over. Each output is
        per image along `images_dim` (Gemma 3's pixels per image, Qwen2-VL's patches and grids, Idefics3's tiles),
        so the images' outputs joined are those of the images processed together (Idefics3's as one row of
        images, which the model takes whatever rows their tokens are in)."""
        from PIL import Image
        from transformers.image_utils import load_image

        parts = []
        for data in images:
            # Upright as a viewer shows it (a phone photo's EXIF orientation applied) and in RGB, as transformers'
            # processors load an image file.
            picture = load_image(Image.open(io.BytesIO(data)))
            parts.append(self.image_processor(images=[picture], return_tensors="pt"))
            del picture
        if len(parts) == 1:
            return parts[0]
        return {key: torch.cat([part[key] for part in parts], self.images_dim) for key in parts[0]} if parts else {}

    def model_inputs(self, images: Sequence[bytes], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a forward of `input_ids` whose image tokens show `images` (in order, row by row) takes beside
        them: the pixels (and, for Qwen2-VL, each image's grid; for Idefics3, which pixels are the image's), and
        where the image tokens are (for the models that take it)."""
        processed = self._processed(images)
        wanted = ("pixel_values", "image_grid_thw", "pixel_attention_mask")
        out = {key: processed[key] for key in wanted if key in processed}
        if self.type_ids is not None:
            out[self.type_ids] = self.token_type_ids(input_ids)
        return out

    def token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """1 at image tokens, 0 elsewhere (Gemma 3 attends within an image both ways; Qwen2-VL places them in 3-D)."""
        return (input_ids == self.image_token_id).long()

    def shown(self, input_ids: Sequence[int]) -> int:
        """How many images' tokens `input_ids` holds: each image is one run of the image token, or holds
        `once_per_image` once."""
        ids = list(input_ids)
        if self.once_per_image is not None:
            return ids.count(self.once_per_image)
        return sum(1 for i, t in enumerate(ids) if t == self.image_token_id and (i == 0 or ids[i - 1] != t))

    def fingerprint(self) -> str:
        """What changes the tokens or pixels a row becomes (for the data cache's key)."""
        return json.dumps(
            [self.marker, self.settings, self.image_token_id, self.image_processor.to_dict(), "exif upright"],
            default=str,
        )


def load_image_inputs(folder: str | Path, tokenizer) -> ImageInputs | None:
    """The image side of the model in `folder`, None where it reads no images (no processor with an
    image processor beside it)."""
    folder = Path(folder)
    if not (folder / "processor_config.json").is_file() and not (folder / "preprocessor_config.json").is_file():
        return None
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if config.get("model_type") in QWEN2_VL:
        return _qwen2_vl(folder, tokenizer, config)
    if config.get("model_type") in IDEFICS3:
        return _idefics3(folder, tokenizer, config)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, tokenizer=tokenizer)
    image_processor = getattr(processor, "image_processor", None)
    sequence = getattr(processor, "full_image_sequence", None)
    if image_processor is None or sequence is None:  # a processor of another family: its images are not read yet
        return None
    return ImageInputs(
        marker=processor.boi_token,
        tokens_of=lambda height, width: sequence,
        image_token_id=tokenizer.image_token_id,
        image_processor=image_processor,
        settings=sequence,
    )


_ORIENTATION = 0x0112
"""The EXIF tag of an image's orientation."""

_QUARTER_TURNS = (5, 6, 7, 8)
"""The EXIF orientations that store an image turned by a quarter (its stored sides swapped)."""

VISION_MODELS = "Gemma 3 4B and up, Qwen2-VL, Qwen2.5-VL, SmolVLM, SmolVLM2"
"""The models tuneforge reads images for, as the refusals of images sent to a text model name them."""

QWEN2_VL = ("qwen2_vl", "qwen2_5_vl")
"""The model types whose images are read the Qwen2-VL way (`_qwen2_vl`)."""

IDEFICS3 = ("idefics3", "smolvlm")
"""The model types whose images are read the Idefics3 way (`_idefics3`): SmolVLM and SmolVLM2."""

IDEFICS3_IMAGE_SEQ_LEN = 169
"""The `<image>` tokens per tile where a folder's processor settings name none (both processors' default)."""


def _qwen2_vl(folder: Path, tokenizer, config: dict) -> ImageInputs:
    """Qwen2-VL's and Qwen2.5-VL's image side, from the image processor alone: their processor also builds a
    video processor, which needs torchvision. An image's tokens are its processor's
    (`Qwen2VLProcessor.replace_image_token`): one `<|image_pad|>` per merged patch of the grid its size gives
    (`get_number_of_image_patches`, as the processor counts them without the pixels)."""
    from transformers import AutoImageProcessor

    image_processor = AutoImageProcessor.from_pretrained(folder)
    marker = "<|image_pad|>"
    merged = image_processor.merge_size**2
    return ImageInputs(
        marker=marker,
        tokens_of=lambda height, width: marker * (image_processor.get_number_of_image_patches(height, width) // merged),
        image_token_id=config.get("image_token_id", tokenizer.convert_tokens_to_ids(marker)),
        image_processor=image_processor,
        type_ids="mm_token_type_ids",
        rope_from_images=True,
        sized=True,
    )


def _idefics3(folder: Path, tokenizer, config: dict) -> ImageInputs:
    """Idefics3's (SmolVLM's) and SmolVLM2's image side, from the image processor alone: SmolVLM2's processor also
    builds a video processor, which needs torchvision. The image processor resizes an image, splits it into tiles of
    the vision encoder's size and adds the whole image resized to one; the processor writes each tile's
    `image_seq_len` `<image>` tokens after `<fake_token_around_image><row_R_col_C>` and the whole image's after
    `<global-img>` (`get_image_prompt_string`, which `SmolVLMProcessor.replace_image_token` calls and
    `Idefics3Processor.replace_image_token` writes out), for the rows and columns of tiles the image's size gives
    (`get_number_of_image_patches`, as the processor counts them without the pixels)."""
    from transformers import AutoImageProcessor
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string
    from transformers.processing_utils import ProcessorMixin

    image_processor = AutoImageProcessor.from_pretrained(folder)
    image_seq_len = ProcessorMixin.get_processor_dict(folder)[0].get("image_seq_len", IDEFICS3_IMAGE_SEQ_LEN)
    # The tokens as SmolVLMProcessor takes them: those its tokenizer names, else the ones Idefics3Processor writes.
    marker = getattr(tokenizer, "image_token", None) or "<image>"
    around = getattr(tokenizer, "fake_image_token", None) or "<fake_token_around_image>"
    whole = getattr(tokenizer, "global_image_token", None) or "<global-img>"

    def tokens_of(height: int, width: int) -> str:
        _, rows, cols = image_processor.get_number_of_image_patches(height, width)
        return get_image_prompt_string(rows, cols, image_seq_len, around, marker, whole)

    return ImageInputs(
        marker=marker,
        tokens_of=tokens_of,
        image_token_id=config.get("image_token_id", tokenizer.convert_tokens_to_ids(marker)),
        image_processor=image_processor,
        type_ids=None,
        sized=True,
        settings=f"image_seq_len={image_seq_len}",
        once_per_image=tokenizer.convert_tokens_to_ids(whole),
        images_dim=1,
    )
