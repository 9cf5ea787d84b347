"""The TorchScript archives LAMMPS users already hold, behind the model contract, without unpickling.

Loading a TorchScript archive compiles the TorchScript code stored in it; torch's loader builds
only TorchScript objects and tensors (no Python class named in the file is imported or run), and
neither nequip nor mace needs to be installed. Kinds, recognised from the archive's contents
(``archive_kind``: its extra files and the names of its scripted classes):

* **nequip / Allegro**: ``nequip-compile --mode torchscript`` (nequip >= 0.7; extra files
  ``r_max``, ``type_names``, ``model_dtype``, optionally ``per_edge_type_cutoff``) and
  ``nequip-deploy`` (nequip 0.5 / 0.6; also ``config``, ``nequip_version``): what ``pair_nequip``
  and ``pair_allegro`` read. The energy model inside (the ``SequentialGraphNetwork`` under
  ``GraphModel`` / ``GradientOutput``) runs stage by stage exactly as ``NequIPForceField``
  runs a Python model (``NequIPStages``): per-atom energies and the latent from the model's own
  fields, forces from our per-pair gradient, never the archive's total-energy gradient. A NequIP
  archive keeps its convolutions reachable, so it takes the per-layer ghost exchange.
* **metatomic** ``AtomisticModel`` exports (``*/extra/metatomic-version``): ``ltau_lmp.model.metatomic``.
* **MACE**: ``mace_create_lammps_model``'s ``*-lammps.pt`` (a scripted ``LAMMPS_MACE``, the MACE
  under ``.model``; what ``pair_style mace`` reads) and ``mace_run_train``'s ``*_compiled.model``
  (the scripted MACE itself). The MACE is called with ``compute_force=False`` on the contract's
  graph (``mace_graph``, as ``MACEForceField`` calls a Python MACE). Its layers are also run one by
  one from its scripted children (``MACELayers``), checked at load against the module's own forward
  on a probe cluster: where they agree the archive takes the per-layer ghost exchange.

An archive that was frozen (``torch.jit.freeze``: no submodules left), lacks the metadata the
card needs, or exposes no per-atom features is refused with what is missing.
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile

import torch
from ase.data import chemical_symbols
from torch import Tensor, nn

from ltau_lmp.errors import ConfigError, FileFormatError
from ltau_lmp.model.contract import ForceField
from ltau_lmp.model.mace import MACEModule, mace_graph
from ltau_lmp.model.nequip import (NequIPStages, chemical_types, latent_description, model_state,
                                   per_edge_type_cutoffs, stage_kind)

NEQUIP_EXTRA = ("r_max", "type_names", "num_types", "model_dtype", "per_edge_type_cutoff", "nequip_version",
                "config")
MACE_EXTRA = ("config.yaml", "commit.txt")
_SEQUENTIAL = "SequentialGraphNetwork"
_RESCALE = "RescaleOutput"
_MACE_WRAPPER = "LAMMPS_MACE"
_FROZEN = ("the archive's modules are not reachable (was it frozen with torch.jit.freeze, as pair_nequip "
           "freezes after loading? give the file nequip or MACE wrote)")


def archive_kind(path: str) -> tuple[str, str]:
    """(family, what the archive is, in words) of a TorchScript archive, from its zip listing."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    extra = {name.split("/extra/", 1)[1] for name in names if "/extra/" in name}
    code = "\n".join(name for name in names if "/code/" in name)
    if "metatomic-version" in extra:
        return "metatomic", "a metatomic AtomisticModel archive"
    if {"r_max", "type_names"} <= extra or "/code/__torch__/nequip/" in code:
        family = "allegro" if "/code/__torch__/allegro/" in code else "nequip"
        made_by = "nequip-deploy" if "nequip_version" in extra else "nequip-compile"
        return family, f"a {made_by} TorchScript archive ({family})"
    if "/code/__torch__/mace/" in code:
        return "mace", "a MACE TorchScript archive"
    raise FileFormatError(f"model file {path} is a TorchScript archive of a kind ltau_lmp does not run "
                          f"(known: nequip-deploy / nequip-compile --mode torchscript archives, MACE's "
                          f"*-lammps.pt and *_compiled.model); its extra files: {sorted(extra) or 'none'}")


def load_archive(path: str, map_location="cpu") -> ForceField:
    """The force field in a TorchScript archive (module docstring); loading runs no pickled Python."""
    family, _ = archive_kind(path)
    try:
        if family == "metatomic":
            from ltau_lmp.model.metatomic import MetatomicForceField

            model = MetatomicForceField(path)
        else:
            model = NequIPArchive(path) if family in ("nequip", "allegro") else MACEArchive(path)
    except ConfigError as exc:
        raise FileFormatError(f"model file {path}: {exc}") from exc
    return model.to(map_location)


def _load(path: str, keys: tuple[str, ...]) -> tuple[torch.jit.ScriptModule, dict[str, str]]:
    """The scripted module and its extra files (absent ones omitted)."""
    extra = {key: "" for key in keys}
    try:
        module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError and others for corrupt or foreign archives
        raise FileFormatError(f"model file {path}: torch could not load the TorchScript archive "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    return module.eval(), {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in extra.items() if v}


def _archive_hash(module: nn.Module, metadata: dict) -> dict:
    """What the hash covers besides the weights: the scripted classes' code and the metadata."""
    code = hashlib.sha256()
    for _, sub in sorted(module.named_modules(), key=lambda item: item[0]):
        code.update(getattr(sub, "code", "").encode())
    return {"code": code.hexdigest(), "metadata": metadata}


def _floating_dtype(module: nn.Module) -> torch.dtype:
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    if not tensors:
        raise ConfigError("the archive holds no floating-point weights to tell its dtype")
    return tensors[0].dtype


def _probe(species: int, cutoff: float, dtype: torch.dtype):
    """A cluster of four atoms of species 0 (every pair within the cutoff, both directions):
    (positions, species, centers, neighbors) to run an archive once and read its widths."""
    positions = torch.tensor([[0.0, 0.0, 0.0], [0.45, 0.0, 0.0], [0.1, 0.4, 0.0], [0.15, 0.1, 0.38]],
                             dtype=dtype) * cutoff
    pairs = torch.tensor([(i, j) for i in range(4) for j in range(4) if i != j])
    return positions, torch.zeros(4, dtype=torch.int64), pairs[:, 0], pairs[:, 1]


class NequIPArchive(NequIPStages):
    """A nequip-compile / nequip-deploy TorchScript archive (module docstring)."""

    def __init__(self, path: str):
        super().__init__()
        module, metadata = _load(path, NEQUIP_EXTRA)
        missing = [key for key in ("r_max", "type_names") if not metadata.get(key, "").strip()]
        if missing:
            raise ConfigError(f"the nequip archive lacks the extra file(s) {', '.join(missing)} "
                              f"(the cutoff and the species names the card needs)")
        self.archive = module
        energy_model, self._energy_scale = _energy_model(module)
        self._setup_stages(energy_model)
        self.species = chemical_types(metadata["type_names"].split())
        self.cutoff = float(metadata["r_max"])
        self._set_pair_cutoffs(per_edge_type_cutoffs(metadata.get("per_edge_type_cutoff"), len(self.species),
                                                     self.cutoff))
        self._metadata = metadata
        self._dtype = getattr(torch, metadata["model_dtype"]) if metadata.get("model_dtype") else _floating_dtype(module)
        widths: list[int] = []
        positions, species, centers, neighbors = _probe(len(self.species), self.cutoff, self._dtype)
        # the probe records the width of every exchanged node-feature block (exchange = identity)
        try:
            _, latent = NequIPStages.forward(self, positions, species, centers, neighbors, None, 4,
                                             exchange=lambda f: widths.append(f.shape[1]) or f)
        except KeyError as exc:
            raise ConfigError(f"the archive's energy model exposes no per-atom features (no {exc} field after its "
                              f"stages): LTAU has no latent to index") from exc
        self.exchange_widths = tuple(widths)
        self.latent_dim = latent.shape[1]
        self.latent_description = latent_description(self.family, self.num_layers, self.latent_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def trainable(self) -> nn.Module:
        """The archive's module: its state dict has the trained model's names (replay loads a
        per-epoch checkpoint of the same model into it)."""
        return self.archive

    def architecture(self) -> dict:
        return {"family": self.family, "archive": "nequip TorchScript", **_archive_hash(self.archive, self._metadata)}

    def checkpoint_state(self, payload) -> dict:
        """A nequip >= 0.7 Lightning checkpoint's live weights, else the payload itself (a state dict
        of the deployed model, alone or under "model")."""
        if isinstance(payload, dict) and "state_dict" in payload:
            return model_state(payload["state_dict"])
        return super().checkpoint_state(payload)

    def forward(self, positions: Tensor, species: Tensor, centers: Tensor, neighbors: Tensor,
                shifts: Tensor | None, n_local: int, exchange=None) -> tuple[Tensor, Tensor]:
        atom_energy, latent = super().forward(positions, species, centers, neighbors, shifts, n_local, exchange)
        return (atom_energy if self._energy_scale == 1.0 else atom_energy * self._energy_scale), latent


def _energy_model(module: nn.Module) -> tuple[nn.Module, float]:
    """The SequentialGraphNetwork inside a nequip archive (down ``model`` / ``func`` children) and
    the global energy scale of any ``RescaleOutput`` on the way (nequip 0.5 / 0.6)."""
    scale, node, path = 1.0, module, []
    while stage_kind(node) != _SEQUENTIAL:
        path.append(stage_kind(node))
        if stage_kind(node) == _RESCALE:
            scale *= _rescale_factor(node)
        children = dict(node.named_children())
        if not children:
            raise ConfigError(_FROZEN)
        node = children.get("func", children.get("model"))
        if node is None:
            raise ConfigError(f"no nequip energy model (SequentialGraphNetwork) under {' > '.join(path)}; "
                              f"children: {', '.join(children)}")
    if not _callable_children(node):
        raise ConfigError(_FROZEN)
    return node, scale


def _callable_children(module: nn.Module) -> bool:
    """Every child keeps its forward (a frozen archive keeps the children's attributes, inlined)."""
    children = list(module.children())
    return bool(children) and all(hasattr(child, "forward") for child in children)


def _rescale_factor(rescale: nn.Module) -> float:
    """The factor a nequip 0.5 / 0.6 ``RescaleOutput`` applies to the energies; a global shift of
    the total energy has no per-atom share, so such an archive is refused."""
    if bool(getattr(rescale, "has_shift", False)) and "total_energy" in list(getattr(rescale, "shift_keys", [])):
        raise ConfigError("the archive shifts its total energy globally (RescaleOutput with a shift): per-atom "
                          "energies, which the tools sum over each rank's atoms, are not defined")
    if not bool(getattr(rescale, "has_scale", False)):
        return 1.0
    if "total_energy" not in list(getattr(rescale, "scale_keys", [])):
        return 1.0
    return float(rescale.scale_by)


class MACEArchive(MACEModule):
    """A MACE TorchScript archive (module docstring)."""

    def __init__(self, path: str):
        super().__init__()
        module, metadata = _load(path, MACE_EXTRA)
        inner = module.model if stage_kind(module) == _MACE_WRAPPER else module
        missing = [name for name in ("atomic_numbers", "r_max", "num_interactions") if not hasattr(inner, name)]
        if missing:
            raise ConfigError(f"the MACE archive lacks {', '.join(missing)} (the species, cutoff and layers the "
                              f"card needs)")
        if not hasattr(inner, "forward"):
            raise ConfigError(_FROZEN)
        self.archive, self.mace = module, inner
        self._metadata = {key: metadata[key] for key in metadata if key != "commit.txt"}
        self.species = tuple(chemical_symbols[int(z)] for z in inner.atomic_numbers)
        self.cutoff = float(inner.r_max)
        self.num_layers = int(inner.num_interactions)
        head = getattr(module, "head", None)
        self.register_buffer("head_index", head.reshape(1).long() if isinstance(head, Tensor) else
                             torch.zeros(1, dtype=torch.int64), persistent=False)
        probe = _probe(len(self.species), self.cutoff, self.dtype)
        own = self._own(*probe, None)
        blocks = MACELayers(inner).check(*probe, self.head_index, own)
        self.ghost_exchange = blocks is not None
        features = int(dict(inner.named_modules())["node_embedding.linear"].weight.numel()) // len(self.species)
        if blocks is None:  # MACE's layout (extract_invariant): l_max blocks of (l+1)^2 F, the last layer F wide
            total = own[1].shape[1] // features
            full = (total - 1) / max(1, self.num_layers - 1)
            blocks = [int(full) * features] * (self.num_layers - 1) + [features]
        starts = [sum(blocks[:k]) for k in range(len(blocks))]
        columns = [c for start in starts for c in range(start, start + features)]
        self.register_buffer("latent_columns", torch.tensor(columns), persistent=False)
        self.exchange_widths = tuple(blocks[:-1]) if self.ghost_exchange else ()
        self.latent_dim = len(columns)
        self.latent_description = (f"MACE invariant (0e) node features of all {self.num_layers} interaction layers "
                                   f"({' + '.join([str(features)] * self.num_layers)} channels)")

    def architecture(self) -> dict:
        return {"family": self.family, "archive": "MACE TorchScript", "head": int(self.head_index),
                **_archive_hash(self.archive, self._metadata)}

    def _unrolled(self) -> "MACELayers":
        """The layer-by-layer runner of the MACE inside, built once (not copied: a copy rebuilds it
        over its own modules)."""
        unrolled = self.__dict__.get("_unrolled_memo")
        if unrolled is None:
            unrolled = self.__dict__["_unrolled_memo"] = MACELayers(self.mace)
        return unrolled

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_unrolled_memo", None)
        return state

    def _own(self, positions, species, centers, neighbors, shifts) -> tuple[Tensor, Tensor]:
        """(node energies, node_feats) of the MACE's own forward on every node of the graph."""
        data = mace_graph(positions, species, centers, neighbors, shifts, len(self.species), self.head_index)
        out = self.mace(data, training=False, compute_force=False)
        if out.get("node_feats") is None:
            raise ConfigError("the MACE archive exposes no per-atom features (node_feats): LTAU has no latent to index")
        return out["node_energy"], out["node_feats"]

    def forward(self, positions: Tensor, species: Tensor, centers: Tensor, neighbors: Tensor,
                shifts: Tensor | None, n_local: int, exchange=None) -> tuple[Tensor, Tensor]:
        """Return (atom_energy (n_local,), latent (n_local, latent_dim)); contract in architecture.md."""
        positions = positions.to(self.dtype)
        if not positions.requires_grad:  # MACE calls requires_grad_() on its input: a fresh leaf
            positions = positions.detach()
        if n_local == 0:
            return self.no_local_atoms(positions, shifts, exchange)
        if exchange is None:
            energy, feats = self._own(positions, species, centers, neighbors, shifts)
        else:
            energy, feats = self._unrolled()(positions, species, centers, neighbors, shifts, self.head_index,
                                             exchange)
        return energy[:n_local], feats[:n_local].index_select(1, self.latent_columns)


class MACELayers:
    """A scripted MACE run layer by layer from its children (MACE's own forward, unrolled), so that
    ``exchange`` can refresh the ghost rows of the node features before every layer after the
    first. ``check`` compares it with the module's forward on a probe: a MACE variant with parts
    this does not run (a pair repulsion, embeddings of other inputs) does not agree and keeps the
    thick ghost shell."""

    def __init__(self, mace: nn.Module):
        self.modules = dict(mace.named_modules())
        self.mace = mace
        self.readouts = sorted(name for name in self.modules if name.startswith("readouts.") and name.count(".") == 1)

    def __call__(self, positions, species, centers, neighbors, shifts, head_index, exchange=None,
                 blocks: list | None = None):
        m = self.modules
        edge_index = torch.stack([neighbors, centers])  # MACE gathers at edge_index[1]: the centre
        vectors = positions[centers] - positions[neighbors]
        if shifts is not None:
            vectors = vectors - shifts.to(positions.dtype)
        lengths = torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
        node_attrs = nn.functional.one_hot(species, len(self.mace.atomic_numbers)).to(positions.dtype)
        heads = head_index.expand(len(positions))
        rows = torch.arange(len(positions), device=positions.device)
        e0 = m["atomic_energies_fn"](node_attrs)
        e0 = e0[rows, heads] if e0.dim() == 2 else e0
        feats = m["node_embedding"](node_attrs)
        harmonics = m["spherical_harmonics"](vectors)
        edge_feats, cutoff = m["radial_embedding"](lengths, node_attrs, edge_index, self.mace.atomic_numbers)
        layers = []
        for k in range(int(self.mace.num_interactions)):
            if k > 0 and exchange is not None:
                feats = exchange(feats)
            feats, skip = m[f"interactions.{k}"](node_attrs, feats, harmonics, edge_feats, edge_index, cutoff,
                                                 None, (0, 0), k == 0)
            feats = m[f"products.{k}"](feats, skip, node_attrs)
            layers.append(feats)
        if blocks is not None:
            blocks.extend(layer.shape[1] for layer in layers)
        readout = [m[name](layers[-1 if len(self.readouts) == 1 else k], heads)
                   for k, name in enumerate(self.readouts)]
        interaction = torch.stack([r[rows, heads] if r.dim() == 2 else r.view(-1) for r in readout]).sum(0)
        if "scale_shift" in m:
            interaction = m["scale_shift"](interaction, heads)
        energy = e0.to(torch.float64) + interaction.to(torch.float64)
        return energy.to(e0.dtype if "scale_shift" not in m else torch.float64), torch.cat(layers, dim=1)

    def check(self, positions, species, centers, neighbors, head_index, own: tuple[Tensor, Tensor]) -> list[int] | None:
        """Each layer's node-feature width if the unrolled layers reproduce ``own`` (the module's
        node energies and features on the probe), else None."""
        if any(name.startswith(("pair_repulsion", "embedding", "joint_embedding", "lammps")) for name in self.modules):
            return None
        blocks: list[int] = []
        try:
            energy, feats = self(positions, species, centers, neighbors, None, head_index, blocks=blocks)
        except Exception:  # a MACE variant whose children take other arguments: not this layout
            return None
        tol = 1e-9 if positions.dtype == torch.float64 else 1e-4
        own = (own[0].detach(), own[1].detach())
        scale = float(own[0].abs().max()) + 1.0
        same = (energy.shape == own[0].shape and feats.shape == own[1].shape
                and float((energy - own[0]).abs().max()) <= tol * scale
                and float((feats - own[1]).abs().max()) <= tol * (float(own[1].abs().max()) + 1.0))
        return blocks if same and math.isfinite(scale) else None


def is_torchscript(path: str | os.PathLike) -> bool:
    """A zip archive with TorchScript code entries."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())
