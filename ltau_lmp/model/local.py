"""The built-in strictly local force field: radial + 3-body invariants -> MLP -> atom energy.

Descriptor of atom i (a Cartesian-moment power spectrum, linear cost in the number of pairs):

* per pair a radial basis g_k(r) = sqrt(2/rc) sin(k pi r / rc) / r * f_cut(r), with a quintic
  envelope f_cut that is C2-smooth and exactly 0 at r >= rc, mixed into ``n_radial`` channels
  by learnable weights that depend on the (centre, neighbour) species pair;
* per atom the moments A_l[n] = sum_j R_n(r_ij) u_ij^(x)l for l = 0..max_l (u = unit vector);
* invariants A_0[n] and <A_l[n], A_l[m]> = sum_jk R_n R_m cos^l(theta_jik) for l >= 1, n <= m.
  The powers cos^0..cos^max_l span the Legendre polynomials P_0..P_max_l, so this is the usual
  3-body power spectrum.

The invariants are normalised (buffers ``feature_mean`` / ``feature_std``, see
``fit_normalization``), concatenated with the centre's species one-hot and passed through an
MLP whose last hidden layer (width ``latent_dim``) is the latent vector LTAU searches; a linear
readout plus a per-species ``reference_energy`` gives the atom energy.
"""

from __future__ import annotations

import math

import torch
from ase.data import atomic_numbers
from torch import Tensor, nn

from ltau_lmp.errors import ConfigError
from ltau_lmp.model.contract import ForceField

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _monomials(max_l: int) -> tuple[list[tuple[list[int], list[int]]], list[int], Tensor]:
    """Unique Cartesian monomials u_a1 u_a2 ... u_al (a1 <= ... <= al) for l = 1..max_l.

    Returns per l the (parent monomial of degree l-1, extra axis) index lists that build degree l
    from degree l-1, the number of monomials per l, and sqrt of the multinomial weights of all
    monomials (degree 0 included), so that a plain dot product of two weighted monomial vectors
    of degree l equals the full tensor contraction (u.v)^l.
    """
    levels, steps, weights = [[()]], [], [1.0]
    for l in range(1, max_l + 1):
        level = sorted({tuple(sorted(m + (axis,))) for m in levels[-1] for axis in range(3)})
        parents = {m: k for k, m in enumerate(levels[-1])}
        steps.append(([parents[m[:-1]] for m in level], [m[-1] for m in level]))
        weights += [math.sqrt(math.factorial(l) / math.prod(math.factorial(m.count(a)) for a in range(3)))
                    for m in level]
        levels.append(level)
    return steps, [len(level) for level in levels], torch.tensor(weights, dtype=torch.float64)


def _neighbor_slots(centers: Tensor, n_local: int) -> tuple[Tensor, int]:
    """Row of each pair in an (n_local x width) padded layout, width = most pairs of any atom."""
    counts = torch.bincount(centers, minlength=n_local)
    width = max(int(counts.max()), 1) if len(centers) else 1
    sorted_centers, order = torch.sort(centers, stable=True)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(centers)
    slot[order] = sorted_centers * width + torch.arange(len(centers), device=centers.device) - first[sorted_centers]
    return slot, width


class LocalForceField(ForceField):
    """Strictly local invariant force field; see the module docstring and doc/architecture.md."""

    family = "ltau_local"

    def __init__(
        self,
        species: list[str],
        cutoff: float = 4.0,
        n_basis: int = 8,
        n_radial: int = 8,
        max_l: int = 3,
        hidden: list[int] | tuple[int, ...] = (64,),
        latent_dim: int = 32,
        dtype: str = "float64",
        seed: int | None = None,
    ):
        super().__init__()
        species = list(species)
        if not species or len(set(species)) != len(species):
            raise ConfigError(f"species must be a non-empty list of distinct symbols, got {species}")
        unknown = [s for s in species if s not in atomic_numbers]
        if unknown:
            raise ConfigError(f"unknown chemical symbol(s) {unknown} in species")
        if not (cutoff > 0 and math.isfinite(cutoff)):
            raise ConfigError(f"cutoff must be a positive number of Angstrom, got {cutoff}")
        for name, value in (("n_basis", n_basis), ("n_radial", n_radial), ("latent_dim", latent_dim)):
            if int(value) < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if int(max_l) < 0:
            raise ConfigError(f"max_l must be >= 0, got {max_l}")
        if any(int(h) < 1 for h in hidden):
            raise ConfigError(f"hidden layer widths must be >= 1, got {list(hidden)}")
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")

        self.config = {
            "species": species, "cutoff": float(cutoff), "n_basis": int(n_basis),
            "n_radial": int(n_radial), "max_l": int(max_l), "hidden": [int(h) for h in hidden],
            "latent_dim": int(latent_dim), "dtype": dtype,
        }
        self.species = species
        self.cutoff = float(cutoff)
        self.latent_dim = int(latent_dim)
        self.latent_description = (f"last hidden MLP layer ({self.latent_dim} wide) over the normalised radial "
                                   f"and 3-body invariants (l <= {int(max_l)}) and the species one-hot")
        n_species, n_radial, max_l = len(species), int(n_radial), int(max_l)

        self.register_buffer("frequencies", torch.arange(1, n_basis + 1) * math.pi / self.cutoff,
                             persistent=False)
        steps, self._level_sizes, sqrt_weights = _monomials(max_l)
        for l, (parents, axes) in enumerate(steps, start=1):
            self.register_buffer(f"monomial_parents_{l}", torch.tensor(parents), persistent=False)
            self.register_buffer(f"monomial_axes_{l}", torch.tensor(axes), persistent=False)
        self.register_buffer("angular_weights", sqrt_weights[:, None], persistent=False)
        self.register_buffer("triu", torch.triu_indices(n_radial, n_radial), persistent=False)
        n_features = n_radial + max_l * self.triu.shape[1]
        self.n_features = n_features
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            mixing = torch.randn(n_species * n_species, n_basis, n_radial)
            self.radial_mixing = nn.Parameter(mixing / math.sqrt(n_basis))
            widths = [n_features + n_species, *self.config["hidden"], self.latent_dim]
            layers = []
            for w_in, w_out in zip(widths[:-1], widths[1:]):
                layers += [nn.Linear(w_in, w_out), nn.SiLU()]
            self.mlp = nn.Sequential(*layers)
            self.readout = nn.Linear(self.latent_dim, 1)
        self.reference_energy = nn.Parameter(torch.zeros(n_species))
        self.to(_DTYPES[dtype])

    @property
    def dtype(self) -> torch.dtype:
        return self.readout.weight.dtype

    def architecture(self) -> dict:
        """The hash covers the config and every state tensor."""
        return self.config

    def descriptors(self, positions: Tensor, species: Tensor, centers: Tensor, neighbors: Tensor,
                    shifts: Tensor | None, n_local: int) -> Tensor:
        """Raw (un-normalised) invariants, (n_local, n_features); pairs with r >= cutoff are dropped."""
        vectors = positions.index_select(0, neighbors) - positions.index_select(0, centers)
        if shifts is not None:
            vectors = vectors + shifts
        distances = torch.linalg.vector_norm(vectors, dim=1)
        inside = distances < self.cutoff
        if not bool(inside.all()):
            # Exact zero contribution (and zero gradient) beyond the cutoff: LAMMPS lists carry a skin.
            keep = inside.nonzero().squeeze(1)
            vectors, distances = vectors[keep], distances[keep]
            centers, neighbors = centers[keep], neighbors[keep]

        # Feature-major layout (channels x pairs) keeps every per-pair op a contiguous row op.
        x = distances / self.cutoff
        envelope = 1.0 - x**3 * (10.0 - 15.0 * x + 6.0 * x**2)
        basis = torch.sin(self.frequencies[:, None] * distances)
        basis = basis * (math.sqrt(2.0 / self.cutoff) * envelope / distances)
        n_species = len(self.species)
        if n_species == 1:
            radial = self.radial_mixing[0].T @ basis
        else:
            pair_type = species[centers] * n_species + species[neighbors]
            onehot = nn.functional.one_hot(pair_type, n_species * n_species).T.to(basis.dtype)
            typed = (onehot[:, None, :] * basis[None, :, :]).reshape(-1, len(distances))
            radial = self.radial_mixing.reshape(len(typed), -1).T @ typed

        unit = (vectors / distances[:, None]).T
        levels = [torch.ones_like(distances)[None, :]]
        for l in range(1, len(self._level_sizes)):
            parents = getattr(self, f"monomial_parents_{l}")
            axes = getattr(self, f"monomial_axes_{l}")
            levels.append(levels[-1].index_select(0, parents) * unit.index_select(0, axes))
        angular = torch.cat(levels, dim=0) * self.angular_weights

        # Moments A[i] = sum_j radial_j (x) angular_j as a batched matmul over neighbour slots: far
        # faster (forward and backward) than scattering an (E, n_radial, n_angular) outer product.
        slot, width = _neighbor_slots(centers, n_local)
        radial_pad = radial.new_zeros(len(radial), n_local * width).index_copy(1, slot, radial)
        angular_pad = angular.new_zeros(len(angular), n_local * width).index_copy(1, slot, angular)
        moments = torch.bmm(radial_pad.view(len(radial), n_local, width).transpose(0, 1),
                            angular_pad.view(len(angular), n_local, width).permute(1, 2, 0))

        features = [moments[:, :, 0]]
        start = 1
        for size in self._level_sizes[1:]:
            block = moments[:, :, start:start + size]
            start += size
            gram = block @ block.transpose(1, 2)
            features.append(gram[:, self.triu[0], self.triu[1]])
        return torch.cat(features, dim=1)

    @torch.no_grad()
    def fit_normalization(self, features: Tensor) -> None:
        """Set the feature mean/std buffers from raw descriptors (n, n_features) of training atoms."""
        features = torch.as_tensor(features, dtype=self.dtype, device=self.feature_mean.device)
        if features.ndim != 2 or features.shape[1] != self.n_features or len(features) < 2:
            raise ConfigError(f"fit_normalization needs (n >= 2, {self.n_features}) features, "
                              f"got {tuple(features.shape)}")
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp_min(1e-8))

    def forward(self, positions: Tensor, species: Tensor, centers: Tensor, neighbors: Tensor,
                shifts: Tensor | None, n_local: int) -> tuple[Tensor, Tensor]:
        """Return (atom_energy (n_local,), latent (n_local, latent_dim)); contract in architecture.md."""
        features = self.descriptors(positions, species, centers, neighbors, shifts, n_local)
        features = (features - self.feature_mean) / self.feature_std
        onehot = nn.functional.one_hot(species[:n_local], len(self.species)).to(features.dtype)
        latent = self.mlp(torch.cat([features, onehot], dim=1))
        atom_energy = self.readout(latent).squeeze(1) + self.reference_energy[species[:n_local]]
        return atom_energy, latent
