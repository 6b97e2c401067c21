"""Every file format of the package, and the files a fit is kept in.

:mod:`.camino` (Camino scheme files), :mod:`.gradients` (b-values,
b-vectors and pulse timings of a dataset), :mod:`.datasets` (public real
data with histology, from the dmipy 1.0.5 files), :mod:`.meshes` (mesh file
formats, the package's meshes), :mod:`.surfaces` (a fit's meshes, in its
voxels' boxes or in scanner coordinates), :mod:`.specs` (a model as JSON),
:mod:`.fits` (a fit saved and loaded), :mod:`.checkpoint` (a fit written a
chunk at a time, and resumed) and :mod:`.maps` (NIfTI maps). This package
is the layer above the models it writes: nothing below it imports it, so it
imports its modules plainly and re-exports their public names (each
module's ``__all__``).
"""

from .camino import (
    read_scheme,
    write_scheme,
)
from .checkpoint import (
    Checkpoint,
    checkpoint_for,
    resume_fit,
    store_path,
)
from .datasets import (
    DMIPY_VERSION,
    RealDataset,
    dmipy_data_folder,
    effective_diameter,
    held_out_shells,
    read_cat_spinal_cord,
    read_isbi2015,
    subset_table,
    thin_qspace,
)
from .fits import (
    load_fit,
    save_fit,
)
from .gradients import (
    B0_THRESHOLD,
    BVECS_TOL,
    read_gradients,
    read_timing,
)
from .maps import (
    DESCRIPTOR_UNITS,
    MAP_UNITS,
    MAPS,
    MESH_MAPS,
    SEARCH_MAPS,
    describe_status,
    save_map,
    save_maps,
    save_permeability,
    save_posterior,
    save_predicted,
)
from .meshes import (
    MESH_FORMATS,
    load_mesh,
    read_mesh,
    save_mesh,
    write_mesh,
)
from .specs import (
    model_from_spec,
    model_spec,
)
from .surfaces import (
    VolumeSurface,
    place_in_voxel,
    remove_voxel_meshes,
    save_interface,
    save_smooth_mesh,
    save_voxel_meshes,
    surface_slabs,
    volume_surface,
)

__all__ = [
    "read_scheme",
    "write_scheme",
    "read_gradients",
    "read_timing",
    "B0_THRESHOLD",
    "BVECS_TOL",
    "RealDataset",
    "read_cat_spinal_cord",
    "read_isbi2015",
    "dmipy_data_folder",
    "effective_diameter",
    "thin_qspace",
    "held_out_shells",
    "subset_table",
    "DMIPY_VERSION",
    "MESH_FORMATS",
    "read_mesh",
    "write_mesh",
    "save_mesh",
    "load_mesh",
    "VolumeSurface",
    "place_in_voxel",
    "volume_surface",
    "surface_slabs",
    "save_voxel_meshes",
    "save_interface",
    "save_smooth_mesh",
    "remove_voxel_meshes",
    "model_spec",
    "model_from_spec",
    "save_fit",
    "load_fit",
    "Checkpoint",
    "checkpoint_for",
    "store_path",
    "resume_fit",
    "MAPS",
    "SEARCH_MAPS",
    "MESH_MAPS",
    "DESCRIPTOR_UNITS",
    "MAP_UNITS",
    "save_map",
    "save_maps",
    "save_permeability",
    "save_predicted",
    "save_posterior",
    "describe_status",
]
