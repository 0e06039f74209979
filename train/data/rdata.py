"""R's XDR serialization, read without R: the character vectors of an R package's lazy-load database.

Data packages keep their objects in `data/Rdata.rdb` (one compressed block per object) indexed by `Rdata.rdx`
(gzip); `read_r_character_vectors` returns their character vectors by name (used for Austen's novels in
r-cran-janeaustenr, `debian_texts.py`).
"""

import bz2
import gzip
import lzma
import struct
import zlib


class _RReader:
  """Reads R's XDR serialization ('X' format, versions 2 and 3) for the types a data package holds: character,
  integer, logical and double vectors, lists, pairlists (attributes) and symbols."""

  def __init__(self, data: bytes):
    if data[:2] != b"X\n":
      raise ValueError(f"not R XDR serialization (starts with {data[:2]!r})")
    self.data, self.pos, self.refs = data, 2, []
    version = self.int()
    self.int(), self.int()                            # writer's and minimal reader's R versions
    if version == 3:
      n = self.int()
      self.pos += n                                   # native encoding name

  def int(self) -> int:
    (value,) = struct.unpack_from(">i", self.data, self.pos)
    self.pos += 4
    return value

  def vector(self, fmt: str, n: int) -> list:
    values = list(struct.unpack_from(f">{n}{fmt}", self.data, self.pos))
    self.pos += n * struct.calcsize(fmt)
    return values

  def item(self):
    flags = self.int()
    kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
    if kind == 254:                                   # NULL
      return None
    if kind == 255:                                   # reference to an earlier symbol
      return self.refs[(flags >> 8 or self.int()) - 1]
    if kind == 1:                                     # symbol: its name
      name = self.item()
      self.refs.append(name)
      return name
    if kind == 9:                                     # CHARSXP: one string (length -1 is NA)
      n = self.int()
      if n == -1:
        return None
      text = self.data[self.pos:self.pos + n].decode("utf-8", errors="replace")
      self.pos += n
      return text
    if kind == 2:                                     # pairlist node: [(tag, value), ...]
      if has_attr:
        self.item()                                   # the node's own attributes: not needed
      tag = self.item() if has_tag else None
      head = [(tag, self.item())]
      return head + (self.item() or [])
    if kind in (10, 13, 14, 16, 19, 20):              # logical, integer, double, character, list, expression
      n = self.int()
      if kind in (10, 13):
        values = self.vector("i", n)
      elif kind == 14:
        values = self.vector("d", n)
      else:
        values = [self.item() for _ in range(n)]
      if has_attr:
        names = dict(self.item() or []).get("names")
        if names is not None:
          return dict(zip(names, values))
      return values
    raise ValueError(f"R serialization type {kind} is not supported by this reader")


def _unpack_block(block: bytes, compression: int) -> bytes:
  """One object of a lazy-load database: 4-byte length, then zlib (compression 1) or a type byte and data."""
  if compression == 1:
    return zlib.decompress(block[4:])
  kind, body = block[4:5], block[5:]
  return {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}[kind](body)


def read_r_character_vectors(rdb: str, rdx: str) -> dict[str, list[str]]:
  """The character vectors of an R lazy-load database (`Rdata.rdb` with its index `Rdata.rdx`), by name."""
  with open(rdx, "rb") as f:
    index = _RReader(gzip.decompress(f.read())).item()
  compression = int(index["compressed"][0]) if index.get("compressed") else 1
  out = {}
  with open(rdb, "rb") as f:
    data = f.read()
  for name, (offset, length) in index["variables"].items():
    value = _RReader(_unpack_block(data[offset:offset + length], compression)).item()
    if isinstance(value, list) and all(v is None or isinstance(v, str) for v in value):
      out[name] = ["" if v is None else v for v in value]
  return out
