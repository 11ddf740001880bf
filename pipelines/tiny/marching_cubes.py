"""The marching-cubes lookup table of diffusers' Shap-E ``MeshDecoder``, derived from the cube's topology.

``MeshDecoder``'s ``cases``/``masks`` buffers are all zeros in a fresh renderer; real
checkpoints carry the table.  The tiny Shap-E models (:mod:`pipelines.tiny.mesh`) save
the one generated here, with one consistent rule for ambiguous faces, so every mesh it
produces is closed and consistently wound.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["marching_cubes_table"]


def _corner(index: int) -> np.ndarray:
    """Cube corner coordinates, as MeshDecoder numbers them: bit 0 is x, bit 1 is y, bit 2 is z."""
    return np.array([index & 1, (index >> 1) & 1, (index >> 2) & 1], dtype=float)


def _edge_index(a: int, b: int) -> int:
    """MeshDecoder's number (0-11) for the cube edge between corners a and b.

    Its edge list (``_create_flat_edge_indices``) is: 0-3 along x at (y, z) = bits of
    the index, 4-7 along y at (x, z), 8-11 along z at (x, y).
    """
    a, b = sorted((a, b))
    axis = {1: 0, 2: 1, 4: 2}[b - a]
    others = [bit for bit in range(3) if bit != axis]
    return 4 * axis + ((a >> others[0]) & 1) + 2 * ((a >> others[1]) & 1)


def _cube_faces() -> list[tuple[list[int], np.ndarray]]:
    """The six cube faces as (corners in cyclic order, outward normal)."""
    faces = []
    for axis in range(3):
        for side in (0, 1):
            corners = [c for c in range(8) if (c >> axis) & 1 == side]
            normal = np.zeros(3)
            normal[axis] = 1.0 if side else -1.0
            faces.append(([corners[0], corners[1], corners[3], corners[2]], normal))
    return faces


def _edge_midpoint(edge: tuple[int, int]) -> np.ndarray:
    """Midpoint of a cube edge, used only to orient segments."""
    return (_corner(edge[0]) + _corner(edge[1])) / 2


def _case_triangles(case: int) -> list[tuple[int, int, int]]:
    """Triangles (as MeshDecoder edge numbers) for one corner sign pattern.

    On each cube face the surface crosses as one or two segments; on an ambiguous
    face (diagonal corners alike) the inside corners are always cut off separately.
    That rule looks only at the face, so the two cubes sharing a face agree and the
    mesh has no cracks.  Segments are oriented so that the surface normal points
    out of the shape (towards negative field, which MeshDecoder treats as outside),
    chained into loops around the cube, and each loop is fan-triangulated.
    """
    inside = [bool((case >> c) & 1) for c in range(8)]
    successor: dict[int, int] = {}
    for ring, normal in _cube_faces():
        signs = [inside[c] for c in ring]
        crossed = [k for k in range(4) if signs[k] != signs[(k + 1) % 4]]
        segments: list[tuple[tuple[int, int], tuple[int, int], np.ndarray]] = []
        if len(crossed) == 2:
            edges = [(ring[k], ring[(k + 1) % 4]) for k in crossed]
            toward = np.mean([_corner(c) for c in ring if inside[c]], axis=0)
            segments.append((edges[0], edges[1], toward))
        elif len(crossed) == 4:
            for k in range(4):
                if signs[k]:
                    before, after = (ring[k], ring[(k - 1) % 4]), (ring[k], ring[(k + 1) % 4])
                    segments.append((before, after, _corner(ring[k])))
        for first, second, toward in segments:
            start, end = _edge_midpoint(first), _edge_midpoint(second)
            # (end - start) x normal must point at the inside corners for an outward-facing surface.
            if np.dot(np.cross(end - start, normal), toward - (start + end) / 2) < 0:
                first, second = second, first
            successor[_edge_index(*first)] = _edge_index(*second)
    triangles: list[tuple[int, int, int]] = []
    while successor:
        loop = [next(iter(successor))]
        while (following := successor.pop(loop[-1])) != loop[0]:
            loop.append(following)
        triangles += [(loop[0], loop[i], loop[i + 1]) for i in range(1, len(loop) - 1)]
    return triangles


def marching_cubes_table() -> tuple[torch.Tensor, torch.Tensor]:
    """The 256-case marching-cubes table in MeshDecoder's layout: ``cases`` (256, 5, 3) edge numbers and ``masks``.

    Derived from the cube topology (no copied table), since a fresh renderer's
    buffers are zeros and only real checkpoints fill them.  Case ``i`` has bit
    ``x + 2y + 4z`` set when that corner's field is > 0 (inside).
    """
    cases = torch.zeros(256, 5, 3, dtype=torch.long)
    masks = torch.zeros(256, 5, dtype=torch.bool)
    for case in range(256):
        triangles = _case_triangles(case)
        if len(triangles) > cases.shape[1]:
            raise AssertionError(f"marching-cubes case {case} needs {len(triangles)} triangles (max 5)")
        for slot, triangle in enumerate(triangles):
            cases[case, slot] = torch.tensor(triangle)
            masks[case, slot] = True
    return cases, masks
