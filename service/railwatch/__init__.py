"""railwatch: watch rail traffic at border crossings from satellite imagery."""

from __future__ import annotations

import warnings

__version__ = "0.1.0"

# rasterio's reproject and rasterize work on in-memory datasets made from numpy arrays with the
# transform passed explicitly; run from several threads (the executor's AOI jobs, Dask workers, the
# read-ahead) they now and then warn "Dataset has no geotransform" (a race in rasterio's own
# suppression: opendatacube/odc-geo#131, GlacioHack/geoutils#851). Only those two entry points are
# silenced: a scene file without georeferencing still warns from rasterio.open, and read_scene reports
# it as the scene's error.
warnings.filterwarnings("ignore", message="Dataset has no geotransform", module=r"rasterio\.(warp|features)$")
