"""Files a fit is kept in and read from.

:mod:`.store` (save, load and resume a fit; its NIfTI maps), :mod:`.surfaces`
(the barrier surfaces of a volume in scanner coordinates), :mod:`.meshes`
(mesh file formats) and :mod:`.gradients` (b-values, b-vectors and pulse
timings of a dataset). The names below are imported on first use, so that
the low layers that write meshes need not import the DIPY layer the store
depends on.
"""

from ..lazy import attach

_NAMES = {
    **dict.fromkeys(
        [
            "MAPS",
            "SEARCH_MAPS",
            "MESH_MAPS",
            "MAP_UNITS",
            "Checkpoint",
            "checkpoint_for",
            "store_path",
            "model_spec",
            "model_from_spec",
            "save_fit",
            "load_fit",
            "resume_fit",
            "save_map",
            "save_maps",
            "save_permeability",
            "save_predicted",
            "save_image",
            "describe_status",
            "save_posterior",
        ],
        "store",
    ),
    **dict.fromkeys(
        [
            "VolumeSurface",
            "place_in_voxel",
            "volume_surface",
            "surface_slabs",
            "save_voxel_meshes",
            "remove_voxel_meshes",
        ],
        "surfaces",
    ),
    **dict.fromkeys(["MESH_FORMATS", "read_mesh", "write_mesh"], "meshes"),
    **dict.fromkeys(["read_gradients", "read_timing"], "gradients"),
}

__all__ = list(_NAMES)
__getattr__, __dir__ = attach(__name__, _NAMES)
