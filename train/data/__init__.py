"""Data pipelines of the training system: MQAR, packed text, token streams, and grain iterators.

Every source is a grain random-access source (`len`, `[index]`) of dicts of numpy arrays; `pipeline.py`
shards, shuffles, repeats and batches them into checkpointable iterators. The modules, each one concept:
  tokenizers.py  the tokenizers and their one description (tokenizer.json, a stream's meta.json)
  packing.py     documents -> BOS + ids + EOS -> fixed-length examples (in memory, or on the fly as grain
                 transforms); IGNORE_INDEX
  text.py        local text files as documents;  sources.py  ArrayRecord / tfds / text-file document sources
  stream.py      a corpus tokenized once by prepare.py, read memory-mapped
  mqar.py        Zoology's MQAR task
  corpus.py      the text corpus, split and prepared from debian_texts.py (books and manual pages of installed
                 Debian packages; rdata.py reads R-serialized ones)
"""
