"""Data pipelines of the training system: MQAR, packed text, token streams, and grain iterators.

Every source is a grain random-access source (`len`, `[index]`) of dicts of numpy arrays; the
pipelines in `pipeline.py` shard, shuffle, repeat and batch them into checkpointable iterators.
`stream.py` reads a corpus tokenized once by `prepare.py` (memory-mapped); `onthefly.py` tokenizes and
packs documents from `sources.py` (text files, ArrayRecord, tfds) as grain transforms (docs/data.md).
"""

from train.data.mqar import fraction_beyond_window
from train.data.mqar import generate_batch as generate_mqar_batch
from train.data.mqar import MQARConfig
from train.data.mqar import MQARSource
from train.data.mqar import query_value_distances
from train.data.mqar import slot_probabilities
from train.data.onthefly import OnTheFlySource
from train.data.pipeline import IGNORE_INDEX
from train.data.pipeline import iterator_restore_args
from train.data.pipeline import iterator_save_args
from train.data.pipeline import make_eval_iterator
from train.data.pipeline import make_train_iterator
from train.data.pipeline import validate_token_ids
from train.data.sources import ArrayRecordDocuments
from train.data.sources import TextFileDocuments
from train.data.sources import TfdsDocuments
from train.data.stream import PackedStreamSource
from train.data.text import list_text_files
from train.data.text import make_text_source
from train.data.text import pack_documents
from train.data.text import PackedTextSource
from train.data.text import read_text_files
from train.data.text import tfds_documents
from train.data.tokenizers import ByteTokenizer
from train.data.tokenizers import SentencePieceTokenizer
from train.data.tokenizers import Tokenizer
from train.data.tokenizers import train_sentencepiece

__all__ = [
    "ArrayRecordDocuments", "ByteTokenizer", "IGNORE_INDEX", "MQARConfig", "MQARSource", "OnTheFlySource",
    "PackedStreamSource", "PackedTextSource", "TextFileDocuments", "TfdsDocuments",
    "SentencePieceTokenizer", "Tokenizer", "fraction_beyond_window", "generate_mqar_batch",
    "iterator_restore_args", "iterator_save_args", "list_text_files", "make_eval_iterator",
    "make_text_source", "make_train_iterator", "pack_documents", "query_value_distances",
    "read_text_files", "slot_probabilities", "tfds_documents", "train_sentencepiece",
    "validate_token_ids",
]
