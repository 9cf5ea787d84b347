"""The estimator's table of per-entry error PDFs, stored as integer masses in blocks of bins.

A dense (n_entries, nbins) float32 table costs 400 B per entry at 100 bins: 4 GB per node at 10^7
entries. Real rows are histograms of one atom's error over the counted epochs: few adjacent bins
(demo estimator: 22.5 non-zero bins of 100, max 47, within 29.5 adjacent ones) of integer counts.
``PDFTable`` keeps, for each row, its non-empty blocks of ``BLOCK`` adjacent bins (the block's
column, uint8, or uint16 beyond 256 blocks, and its ``BLOCK`` masses, uint16) and the row's total;
row r's PDF is ``masses / totals[r]``. The layout is scipy's BSR (indptr, indices, data) with
1 x 8 blocks in the narrowest integer types:

    indptr   (n_entries + 1,) int64     row r's blocks are blocks[indptr[r]:indptr[r + 1]]
    columns  (n_blocks,) uint8|uint16   block b covers bins columns[b] * 8 ... + 7 (bins >= nbins: 0)
    blocks   (n_blocks, 8) uint16       masses
    totals   (n_entries,) uint16|uint32 each row's sum of masses (> 0): the divisor

Demo estimator: 4.5 blocks per row, 86.7 B per row, 4.6x smaller than dense float32 (CSR with one
bin index per mass would be 5.0x, but mixing it needs a per-mass index array: 2-3x slower).

Masses are exact counts when built from an ``ErrorLog`` whose counts fit uint16 (they do with at
most 65535 epochs counted per atom). Float PDFs (and larger counts) are quantised: each row's CDF at every bin
edge, normalised and rounded to a multiple of 1/50400, then differenced, so masses are
non-negative, sum to exactly 50400 and every edge's CDF is within 0.5/50400 = 9.9e-6 of the
input's (rounding each mass instead, even with largest remainders, can shift a CDF by many quanta).
50400 = 2^5 3^2 5^2 7 rather than 65535: halves, thirds, ... and counts over n epochs for every n
dividing it (1-10, 12, 14, 15, 16, 20, ..., 100, 120, ...) are represented exactly.

``DensePDFTable`` is a version-1 estimator's pdfs.npy as loaded: same operations, same answers as
before this module. Both are read without ever building the dense table: ``mix`` gathers the
neighbours' rows, ``expected`` and ``check`` go through rows in chunks.
"""

from __future__ import annotations

import numpy as np

from ltau_lmp.errors import ConfigError
from ltau_lmp.estimator.histogram import CHUNK_ROWS, check_pdfs

BLOCK = 8  # bins per block: 8 mixes 1.2x faster than 4 at 4.6x instead of 4.9x compression (demo)
QUANTISED_TOTAL = 50400  # every quantised row's total: a highly composite number below 2^16
CHECK_SAMPLE = 1000  # rows whose sums are checked at load (all rows cost a pass over the table)
DENSE_MIX_BYTES = 32 << 20  # tables at most this large as dense float32 mix from a dense copy made on first use:
# it stays in cache (demo, 15k entries: 1.8x faster than from blocks); larger ones mix from the blocks
_MASS = np.dtype(np.uint16)


class PDFTable:
    """Integer masses in blocks of adjacent bins (module docstring); ``source`` is "counts" (exact)
    or "quantised" (to 1/50400)."""

    def __init__(self, indptr, columns, blocks, totals, nbins: int, source: str):
        self.indptr, self.columns, self.blocks, self.totals = indptr, columns, blocks, totals
        self.nbins = int(nbins)
        self.source = source
        self._validate()
        self._dense = None  # small tables' dense copy for mixing (DENSE_MIX_BYTES)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_counts(cls, counts) -> "PDFTable":
        """Exact from integer histograms (n, nbins) when every count fits uint16 and every row total
        uint32; else quantised. Rows without counts are refused (their PDF is undefined)."""
        counts = np.asarray(counts)
        if counts.ndim != 2 or 0 in counts.shape or not np.issubdtype(counts.dtype, np.integer):
            raise ConfigError(f"counts must be a non-empty 2-D integer array (n, nbins), got {counts.dtype} "
                              f"{counts.shape}")
        if counts.size and counts.min() < 0:
            raise ConfigError("counts must be non-negative")
        totals = counts.sum(axis=1, dtype=np.uint64)
        empty = np.flatnonzero(totals == 0)
        if empty.size:
            raise ConfigError(f"{empty.size} of {counts.shape[0]} rows have no counted errors (first: {empty[0]}), "
                              f"so no error distribution")
        if counts.max(initial=0) > np.iinfo(_MASS).max or totals.max(initial=0) > np.iinfo(np.uint32).max:
            return cls._encode(counts, lambda rows: _quantise(rows.astype(np.float64)), "quantised")
        return cls._encode(counts, lambda rows: rows, "counts")

    @classmethod
    def from_pdfs(cls, pdfs, where: str = "PDF array") -> "PDFTable":
        """Quantised from float PDFs (n, nbins): non-negative, finite, rows summing to 1 within 1e-3
        (``check_pdfs``; they are renormalised). Read in chunks: ``pdfs`` may be memory-mapped."""
        pdfs = pdfs if isinstance(pdfs, np.ndarray) else np.asarray(pdfs, dtype=np.float32)
        if pdfs.ndim != 2 or pdfs.shape[1] < 1 or pdfs.shape[0] < 1:
            raise ConfigError(f"{where} must be a non-empty 2-D array (n, nbins), got shape {pdfs.shape}")
        if not np.issubdtype(pdfs.dtype, np.number) or np.issubdtype(pdfs.dtype, np.complexfloating):
            raise ConfigError(f"{where} must hold real numbers, got dtype {pdfs.dtype}")
        check_pdfs(pdfs, where=where)
        return cls._encode(pdfs, lambda rows: _quantise(rows.astype(np.float64)), "quantised")

    @classmethod
    def _encode(cls, source, masses_of, kind: str) -> "PDFTable":
        """Blocks of ``masses_of(rows)`` (integer (m, nbins)) for each chunk of ``source``'s rows."""
        n, nbins = source.shape
        ncols = -(-nbins // BLOCK)
        per_row, columns, blocks, totals = [], [], [], []
        for start in range(0, n, CHUNK_ROWS):
            masses = masses_of(np.asarray(source[start:start + CHUNK_ROWS]))
            padded = np.zeros((masses.shape[0], ncols * BLOCK), dtype=_MASS)
            padded[:, :nbins] = masses
            grid = padded.reshape(masses.shape[0], ncols, BLOCK)
            keep = grid.any(axis=2)
            per_row.append(np.count_nonzero(keep, axis=1))
            columns.append(np.nonzero(keep)[1])
            blocks.append(grid[keep])
            totals.append(masses.sum(axis=1, dtype=np.uint64))
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.concatenate(per_row), out=indptr[1:])
        totals = np.concatenate(totals)
        total_type = np.uint16 if totals.max() <= np.iinfo(np.uint16).max else np.uint32
        return cls(indptr, np.concatenate(columns).astype(np.uint8 if ncols <= 256 else np.uint16),
                   np.concatenate(blocks), totals.astype(total_type), nbins, kind)

    def _validate(self) -> None:
        """Structure, in full (O(n_entries + n_blocks)): what ``mix`` indexes with must be in range.
        Row sums are ``check``'s (a pass over all masses)."""
        indptr, columns, blocks, totals = self.indptr, self.columns, self.blocks, self.totals
        if self.source not in ("counts", "quantised"):
            raise ConfigError(f"PDF table masses must be 'counts' or 'quantised', got {self.source!r}")
        if self.nbins < 1:
            raise ConfigError(f"PDF table needs >= 1 bin, got {self.nbins}")
        _expect(indptr, "indptr", (np.int64,), 1)
        _expect(columns, "columns", (np.uint8, np.uint16), 1)
        _expect(blocks, "blocks", (np.uint16,), 2)
        _expect(totals, "totals", (np.uint16, np.uint32), 1)
        n = totals.shape[0]
        if n < 1 or indptr.shape != (n + 1,):
            raise ConfigError(f"PDF table: indptr has {indptr.shape[0]} values for {n} rows (needs rows + 1 >= 2)")
        if blocks.shape[1] < 1 or columns.shape[0] != blocks.shape[0]:
            raise ConfigError(f"PDF table: {columns.shape[0]} block columns for blocks of shape {blocks.shape}")
        if indptr[0] != 0 or indptr[-1] != blocks.shape[0] or np.any(indptr[1:] < indptr[:-1]):
            raise ConfigError(f"PDF table: indptr must rise from 0 to the number of blocks ({blocks.shape[0]}), "
                              f"got {indptr[0]} ... {indptr[-1]}")
        if columns.size and columns.max() >= self.ncols:
            raise ConfigError(f"PDF table: block column {columns.max()} beyond the {self.ncols} blocks of "
                              f"{self.nbins} bins")
        if totals.min() == 0:
            raise ConfigError(f"PDF table: row {int(np.argmin(totals))} has total 0")

    # ------------------------------------------------------------------ shape and size
    @property
    def n_entries(self) -> int:
        return self.totals.shape[0]

    @property
    def block(self) -> int:
        return self.blocks.shape[1]

    @property
    def ncols(self) -> int:
        """Blocks per row when full: the last one may reach past ``nbins`` (those masses are 0)."""
        return -(-self.nbins // self.block)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.indptr, self.columns, self.blocks, self.totals))

    def arrays(self) -> dict:
        """The four arrays by name (what ``io`` writes as pdf_<name>.npy)."""
        return {"indptr": self.indptr, "columns": self.columns, "blocks": self.blocks, "totals": self.totals}

    def describe(self) -> str:
        """Storage in one line, for ``ltau-lmp info``."""
        n = self.n_entries
        masses = "counts" if self.source == "counts" else f"masses quantised to 1/{QUANTISED_TOTAL}"
        return (f"blocks of {self.block} bins, uint16 {masses}: {self.blocks.shape[0] / n:.1f} blocks/row, "
                f"{self.nbytes / n:.1f} B/row, {4 * n * self.nbins / self.nbytes:.1f}x smaller than dense float32")

    # ------------------------------------------------------------------ reading
    def mix(self, neighbors: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Weighted sums of rows: (n, k) entry ids and weights → (n, nbins) float32 (a view of the
        (n, ncols * block) sums).

        The neighbours' blocks are gathered (m of them) and summed by one sparse product: a
        (n * ncols, m) CSC matrix with one entry per block (row: its query and block column;
        value: weight / row total) times the (m, block) masses; scipy's loop adds each block's
        masses into its output row, no per-mass index is formed. 4096 x 10 x 100 bins: 0.9-1.0x
        the time of the dense table's product at 1M-4M entries, 1.7-1.9x at the demo's 15k entries
        (its 6 MB dense table stays in cache; benchmarks/estimator.py prints both): tables up to
        ``DENSE_MIX_BYTES`` dense mix from a dense copy instead.
        """
        n, k = neighbors.shape
        rows = np.asarray(neighbors, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_entries):
            raise ConfigError(f"neighbour ids must lie in [0, {self.n_entries}), got [{rows.min()}, {rows.max()}]")
        if 4 * self.n_entries * self.nbins <= DENSE_MIX_BYTES:
            if self._dense is None:
                self._dense = DensePDFTable(self.rows(np.arange(self.n_entries)))
            return self._dense.mix(neighbors, weights)
        return self._mix_blocks(rows, weights, n, k)

    def _mix_blocks(self, rows: np.ndarray, weights: np.ndarray, n: int, k: int) -> np.ndarray:
        """``mix`` from the blocks: ``rows`` the (n * k) checked neighbour ids."""
        from scipy import sparse

        first = self.indptr.take(rows)
        count = self.indptr.take(rows + 1) - first
        ends = np.cumsum(count)
        m = int(ends[-1]) if rows.size else 0
        ids = np.repeat(first - (ends - count), count)
        ids += np.arange(m, dtype=np.int64)  # the blocks of each neighbour in turn
        index = np.int32 if max(n * k, n * self.ncols, m) < np.iinfo(np.int32).max else np.int64
        per_row = np.empty(n * k, dtype=[("scale", np.float32), ("query_row", index)])  # one np.repeat for both
        per_row["scale"] = np.asarray(weights, dtype=np.float64).reshape(-1) / self.totals.take(rows)
        per_row["query_row"] = np.arange(n * k, dtype=index) // k * self.ncols
        per_block = np.repeat(per_row, count)
        target = per_block["query_row"] + self.columns.take(ids)
        product = sparse.csc_matrix((per_block["scale"], target, np.arange(m + 1, dtype=index)),
                                    shape=(n * self.ncols, m))
        out = product @ self.blocks.take(ids, axis=0).astype(np.float32)
        return out.reshape(n, self.ncols * self.block)[:, :self.nbins]

    def rows(self, ids) -> np.ndarray:
        """Dense float32 PDFs of the entries ``ids`` (a few: (len, nbins) is allocated)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_entries):
            raise ConfigError(f"entry ids must lie in [0, {self.n_entries}), got [{ids.min()}, {ids.max()}]")
        return np.ascontiguousarray(self._mix_blocks(ids, np.ones(ids.size), ids.size, 1))

    def expected(self, values: np.ndarray) -> np.ndarray:
        """Per-entry ``sum_b p_b * values_b`` (values: (nbins,), e.g. bin midpoints), float64, in
        chunks of rows."""
        per_block = np.zeros(self.ncols * self.block)
        per_block[:self.nbins] = values
        per_block = per_block.reshape(self.ncols, self.block)
        out = np.empty(self.n_entries)
        for start, stop, lo, hi in self._chunks():
            sums = np.einsum("bw,bw->b", self.blocks[lo:hi], per_block[self.columns[lo:hi]])
            out[start:stop] = self._row_sums(sums, start, stop) / self.totals[start:stop]
        return out

    def check(self, rows: np.ndarray | None = None, where: str = "PDF table") -> None:
        """Each row's masses sum to its total and bins past ``nbins`` hold none (on ``rows`` only
        when given: at load a sample, like ``check_pdfs``)."""
        pad = self.ncols * self.block - self.nbins
        if rows is None:
            for start, stop, lo, hi in self._chunks():
                self._check_sums(self._row_sums(self.blocks[lo:hi].sum(axis=1, dtype=np.uint64), start, stop),
                                 np.arange(start, stop), where)
                self._check_padding(self.columns[lo:hi], self.blocks[lo:hi], pad, where)
            return
        rows = np.asarray(rows, dtype=np.int64)
        first, count = self.indptr[rows], self.indptr[rows + 1] - self.indptr[rows]
        ids = np.repeat(first - (np.cumsum(count) - count), count) + np.arange(int(count.sum()))
        sums = np.bincount(np.repeat(np.arange(rows.size), count), minlength=rows.size,
                           weights=self.blocks[ids].sum(axis=1, dtype=np.uint64).astype(np.float64))
        self._check_sums(sums, rows, where)
        self._check_padding(self.columns[ids], self.blocks[ids], pad, where)

    def _check_sums(self, sums, rows, where) -> None:
        bad = np.flatnonzero(sums != self.totals[rows])
        if bad.size:
            row = rows[bad[0]]
            raise ConfigError(f"{where}: row {row}'s masses sum to {sums[bad[0]]:.0f}, its total is {self.totals[row]}")

    def _check_padding(self, columns, blocks, pad, where) -> None:
        if pad and np.any(blocks[columns == self.ncols - 1, self.block - pad:]):
            raise ConfigError(f"{where}: masses in bins past the last ({self.nbins})")

    def _chunks(self):
        """(row start, row stop, block lo, block hi) of ``CHUNK_ROWS // 4`` rows at a time: the
        (blocks, block) float64 temporaries stay ~20 MB."""
        step = CHUNK_ROWS // 4
        for start in range(0, self.n_entries, step):
            stop = min(start + step, self.n_entries)
            yield start, stop, int(self.indptr[start]), int(self.indptr[stop])

    def _row_sums(self, per_block: np.ndarray, start: int, stop: int) -> np.ndarray:
        counts = np.diff(self.indptr[start:stop + 1])
        return np.bincount(np.repeat(np.arange(stop - start), counts), weights=per_block, minlength=stop - start)


class DensePDFTable:
    """A version-1 estimator's pdfs.npy ((n_entries, nbins) float32), kept as loaded: memory-mapped,
    so ranks of one node share its pages, and converting 10^7 rows on every rank at every load
    would cost more than reading them. Its answers are those of the code that wrote it (the same
    dense product); ``LTAUEstimator.save`` writes it compressed (``to_table``)."""

    def __init__(self, pdfs: np.ndarray):
        if pdfs.ndim != 2 or pdfs.dtype != np.float32:
            raise ConfigError(f"dense PDF table must be float32 (n, nbins), got {pdfs.dtype} {pdfs.shape}")
        self.pdfs = pdfs

    @property
    def n_entries(self) -> int:
        return self.pdfs.shape[0]

    @property
    def nbins(self) -> int:
        return self.pdfs.shape[1]

    @property
    def nbytes(self) -> int:
        return self.pdfs.nbytes

    def describe(self) -> str:
        return (f"dense float32 (a version-1 estimator; saving it again compresses it), "
                f"{self.nbytes / self.n_entries:.1f} B/row")

    def mix(self, neighbors: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """A sparse (n x entries) weight matrix times the dense table, as version 1 computed it."""
        from scipy import sparse

        n, k = neighbors.shape
        mixing = sparse.csr_matrix((weights.astype(np.float32).ravel(), neighbors.ravel(), np.arange(0, n * k + 1, k)),
                                   shape=(n, self.n_entries))
        return np.asarray(mixing @ self.pdfs, dtype=np.float32)

    def rows(self, ids) -> np.ndarray:
        return np.array(self.pdfs[np.asarray(ids, dtype=np.int64).reshape(-1)], dtype=np.float32)

    def expected(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(self.pdfs @ values.astype(np.float32), np.float64)

    def check(self, rows: np.ndarray | None = None, where: str = "PDF array") -> None:
        check_pdfs(self.pdfs, rows, where=where)

    def to_table(self) -> PDFTable:
        return PDFTable.from_pdfs(self.pdfs)


def as_pdf_table(pdfs) -> PDFTable | DensePDFTable:
    """A table as given; an array (n, nbins) of float PDFs quantised into a ``PDFTable``."""
    if isinstance(pdfs, (PDFTable, DensePDFTable)):
        return pdfs
    return PDFTable.from_pdfs(pdfs)


def _quantise(pdfs: np.ndarray) -> np.ndarray:
    """Integer masses summing to ``QUANTISED_TOTAL`` per row: the rounded, normalised CDF differenced
    (every edge's CDF within 0.5 / QUANTISED_TOTAL of the input's)."""
    cdf = np.cumsum(pdfs, axis=1)
    cdf *= QUANTISED_TOTAL / cdf[:, -1:]
    levels = np.rint(cdf).astype(np.int64)
    return np.diff(levels, axis=1, prepend=0).astype(_MASS)


def _expect(array, name: str, dtypes: tuple, ndim: int) -> None:
    if not isinstance(array, np.ndarray) or array.dtype not in [np.dtype(d) for d in dtypes] or array.ndim != ndim:
        found = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        wanted = " or ".join(np.dtype(d).name for d in dtypes)
        raise ConfigError(f"PDF table {name} must be a {ndim}-D {wanted} array, got {found}")
