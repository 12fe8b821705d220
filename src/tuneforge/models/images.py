"""What a model that reads images needs beside its tokenizer: the processor's image side.

A model folder with a processor (`processor_config.json`, as Gemma 3 4B and up ship it) reads images.
Its chat template writes one marker per image part (Gemma 3: `<start_of_image>`); the processor
replaces each marker with the image's full token sequence (Gemma 3: `\\n\\n<start_of_image>`, the
image's soft tokens, `<end_of_image>\\n\\n`) and turns each image into `pixel_values`. `ImageInputs`
does both for the data pipeline and the batches, exactly as the processor does at inference: the
text is expanded before it is tokenized, the pixels come from the processor's own image processor.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ImageInputs:
    """A model's image side: the marker its template writes per image, the text that replaces it
    (`sequence`), the id of the soft tokens the vision features take the place of, and the image processor."""

    marker: str
    sequence: str
    image_token_id: int
    image_processor: object
    image_size: tuple[int, int]

    def expand(self, text: str) -> str:
        """A rendered conversation with each image marker replaced by the image's token sequence."""
        return text.replace(self.marker, self.sequence)

    def pixel_values(self, images: list[bytes]) -> torch.Tensor:
        """The images (encoded files: PNG, JPEG, ...) as the vision encoder's input, [n, 3, H, W]."""
        from PIL import Image

        pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
        return self.image_processor(images=pictures, return_tensors="pt")["pixel_values"]

    def token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """1 at image soft tokens, 0 elsewhere: the model attends within an image both ways."""
        return (input_ids == self.image_token_id).long()

    def fingerprint(self) -> str:
        """What changes the tokens or pixels a row becomes (for the data cache's key)."""
        return json.dumps([self.sequence, self.image_token_id, self.image_processor.to_dict()], sort_keys=True)


def load_image_inputs(folder: str | Path, tokenizer) -> ImageInputs | None:
    """The image side of the model in `folder`, None where it reads no images (no processor with an
    image processor beside it)."""
    folder = Path(folder)
    if not (folder / "processor_config.json").is_file() and not (folder / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, tokenizer=tokenizer)
    image_processor = getattr(processor, "image_processor", None)
    sequence = getattr(processor, "full_image_sequence", None)
    if image_processor is None or sequence is None:  # a processor of another family: its images are not read yet
        return None
    size = image_processor.size
    return ImageInputs(
        marker=processor.boi_token,
        sequence=sequence,
        image_token_id=tokenizer.image_token_id,
        image_processor=image_processor,
        image_size=(size["height"], size["width"]),
    )
