"""Region shapes: polygons in pixels of the original image, and box-against-shape IoU.

A :class:`Shape` is a polygon or multipolygon stored as GeoJSON ``MultiPolygon`` coordinates (a list of
polygons, each a list of rings, exterior first then holes, each ring a list of ``[x, y]``), in the same
frame as every box: ``xyxy`` pixels of the ORIGINAL image, top-left origin. It is validated when built
(finite, valid, non-empty) and holds a prepared shapely geometry, so scoring a box against it is one
bounds test, one prepared predicate and, only when the box cuts the shape, one intersection.

Builders: :func:`disc_shape` (a disc or ellipse from known geometry) and :func:`shape_from_mask`
(contours of a boolean mask traced with scikit-image, from the ``samples`` extra).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import shapely
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient

BoxCoords = tuple[float, float, float, float]
"""``(x1, y1, x2, y2)`` pixels of the original image (the same alias as :data:`medeyes_env.cases.Box`)."""
Ring = tuple[tuple[float, float], ...]
"""A closed ring of ``(x, y)`` points, first point repeated last."""

COORD_DECIMALS = 3
"""Decimals kept of a built shape's coordinates (a thousandth of a pixel): records stay small and exact to read."""
DISC_SEGMENTS = 64
"""Segments of a disc's polygon: its area is 0.16% below the true disc's (``sin(2 pi / n) n / (2 pi)``)."""


class Shape(BaseModel):
    """A polygon or multipolygon in pixels of the original image, validated and prepared for scoring.

    >>> square = Shape(polygons=[[[(0, 0), (10, 0), (10, 10), (0, 10)]]])
    >>> square.area, square.bounds
    (100.0, (0.0, 0.0, 10.0, 10.0))
    >>> from pydantic import ValidationError
    >>> try:
    ...     Shape(polygons=[[[(0, 0), (10, 10), (10, 0), (0, 10)]]])  # a bow tie
    ... except ValidationError as exc:
    ...     print(exc.errors()[0]["msg"])
    Value error, shape is not a valid polygon (Self-intersection[5 5]); rebuild it with Shape.from_geometry, \
which repairs it
    """

    model_config = ConfigDict(frozen=True)

    polygons: tuple[tuple[Ring, ...], ...] = Field(
        min_length=1,
        description="GeoJSON MultiPolygon coordinates: polygons, each a list of rings (exterior first, then holes), "
        "each ring a list of [x, y] in pixels of the original image; a ring is closed if it is not already.",
    )

    # Read through __pydantic_private__ in the properties: pydantic's __getattr__ for a private name costs ~1.5 us,
    # and scoring reads bounds and area once per box and gold shape.
    _geometry: BaseGeometry = PrivateAttr()
    _area: float = PrivateAttr()
    _bounds: BoxCoords = PrivateAttr()

    @field_validator("polygons")
    @classmethod
    def _rings_are_closed_and_finite(cls, polygons: tuple[tuple[Ring, ...], ...]) -> tuple[tuple[Ring, ...], ...]:
        closed = []
        for polygon in polygons:
            if not polygon:
                raise ValueError("shape has a polygon with no ring; give its exterior ring first")
            rings = []
            for ring in polygon:
                if not all(math.isfinite(value) for point in ring for value in point):
                    raise ValueError("shape has a coordinate that is not a finite number")
                ring = ring if ring and ring[0] == ring[-1] else (*ring, *ring[:1])
                if len(ring) < 4:
                    raise ValueError(f"shape has a ring of {len(ring) - 1} points; a polygon ring needs 3 or more")
                rings.append(ring)
            closed.append(tuple(rings))
        return tuple(closed)

    def model_post_init(self, context: Any, /) -> None:
        """Build the shapely geometry once, refuse an invalid or empty one, and prepare it for scoring."""
        parts = [Polygon(rings[0], rings[1:]) for rings in self.polygons]
        geometry = parts[0] if len(parts) == 1 else MultiPolygon(parts)
        if not geometry.is_valid:
            raise ValueError(
                f"shape is not a valid polygon ({shapely.is_valid_reason(geometry)}); rebuild it with "
                "Shape.from_geometry, which repairs it"
            )
        if not geometry.area > 0.0:
            raise ValueError("shape has no area; a region needs a polygon that encloses pixels")
        shapely.prepare(geometry)
        self._geometry = geometry
        self._area = float(geometry.area)
        self._bounds = tuple(float(v) for v in geometry.bounds)  # type: ignore[assignment]

    @property
    def geometry(self) -> BaseGeometry:
        """The shapely Polygon or MultiPolygon (prepared; do not modify)."""
        return self.__pydantic_private__["_geometry"]  # type: ignore[index]

    @property
    def area(self) -> float:
        """Area in square pixels."""
        return self.__pydantic_private__["_area"]  # type: ignore[index]

    @property
    def bounds(self) -> BoxCoords:
        """The ``xyxy`` box that bounds the shape."""
        return self.__pydantic_private__["_bounds"]  # type: ignore[index]

    @classmethod
    def from_geometry(cls, geometry: BaseGeometry, decimals: int = COORD_DECIMALS) -> Shape:
        """A shape from any shapely geometry: its polygonal parts, repaired, rounded to ``decimals``.

        >>> Shape.from_geometry(shapely.box(0, 0, 2, 1)).area
        2.0
        """
        polygons = _polygonal_parts(shapely.make_valid(geometry))
        rounded = _polygonal_parts(shapely.make_valid(shapely.set_precision(MultiPolygon(polygons), 10.0**-decimals)))
        if not rounded:
            raise ValueError(f"geometry {geometry.geom_type} has no polygon with area; a region needs one")
        return cls(polygons=tuple(_coordinates(polygon, decimals) for polygon in rounded))

    def svg_path(self, scale: float = 1.0) -> str:
        """The outline as an SVG path ``d`` attribute (every ring, holes included), coordinates times ``scale``.

        >>> Shape(polygons=[[[(0, 0), (4, 0), (4, 2)]]]).svg_path(scale=0.5)
        'M0,0 L2,0 L2,1 Z'
        """
        return " ".join(
            "M" + " L".join(f"{x * scale:.4g},{y * scale:.4g}" for x, y in ring[:-1]) + " Z"
            for polygon in self.polygons
            for ring in polygon
        )


def _polygonal_parts(geometry: BaseGeometry) -> list[Polygon]:
    """The polygons with area inside any geometry (a GeometryCollection from make_valid included)."""
    if isinstance(geometry, Polygon):
        return [geometry] if geometry.area > 0.0 else []
    if hasattr(geometry, "geoms"):
        return [part for member in geometry.geoms for part in _polygonal_parts(member)]
    return []


def _coordinates(polygon: Polygon, decimals: int) -> tuple[Ring, ...]:
    polygon = orient(polygon)  # GeoJSON order: exterior counter-clockwise
    rings = [polygon.exterior, *polygon.interiors]
    return tuple(tuple((round(x, decimals), round(y, decimals)) for x, y in ring.coords) for ring in rings)


def box_shape_iou(box: BoxCoords, shape: Shape) -> float:
    """Intersection over union of the areas of an ``xyxy`` box and a shape; 0.0 when the box has no area.

    A box around a disc scores ``pi / 4``: the box's corners are not the region.

    >>> disc = disc_shape(50.0, 50.0, 10.0)
    >>> round(box_shape_iou((40, 40, 60, 60), disc), 3), box_shape_iou((0, 0, 5, 5), disc)
    (0.784, 0.0)
    >>> box_shape_iou((45, 45, 55, 55), disc) == 100 / disc.area  # inside the disc: the box is the overlap
    True
    """
    x1, y1, x2, y2 = box
    box_area = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    if not (box_area > 0.0) or not math.isfinite(box_area):
        return 0.0
    sx1, sy1, sx2, sy2 = shape.bounds
    if x2 <= sx1 or sx2 <= x1 or y2 <= sy1 or sy2 <= y1:
        return 0.0  # bounds apart: no shapely call at all
    if x1 <= sx1 and y1 <= sy1 and x2 >= sx2 and y2 >= sy2:
        inter = shape.area  # the box covers the shape
    else:
        rect = shapely.box(x1, y1, x2, y2)
        geometry = shape.geometry  # prepared: the predicates below are index lookups
        if geometry.contains_properly(rect):
            inter = box_area
        elif not geometry.intersects(rect):
            return 0.0
        else:
            inter = float(shapely.intersection(geometry, rect).area)
    union = box_area + shape.area - inter
    if not (union > 0.0):
        return 0.0
    return min(1.0, inter / union)


def disc_shape(
    cx: float,
    cy: float,
    radius: float,
    radius_y: float | None = None,
    angle_degrees: float = 0.0,
    clip: BoxCoords | None = None,
    segments: int = DISC_SEGMENTS,
) -> Shape:
    """A disc (or an ellipse with ``radius_y`` and a rotation) as a polygon of ``segments`` sides, clipped to ``clip``.

    With the default 64 segments the polygon's area is within 0.2% of the true disc's.

    >>> disc = disc_shape(0.0, 0.0, 10.0)
    >>> abs(disc.area / (math.pi * 100) - 1) < 0.005
    True
    >>> disc_shape(0.0, 0.0, 10.0, clip=(0, 0, 100, 100)).bounds  # a quarter disc
    (0.0, 0.0, 10.0, 10.0)
    """
    radius_y = radius if radius_y is None else radius_y
    if not (radius > 0 and radius_y > 0):
        raise ValueError(f"a disc needs positive radii, got {radius} and {radius_y}")
    # The vertices of Point.buffer (a regular polygon from angle 0), scaled and turned, computed directly:
    # a convex ring, valid by construction, so an unclipped disc needs no shapely repair.
    turn = np.radians(angle_degrees)
    angles = np.linspace(0.0, 2 * np.pi, segments, endpoint=False)
    dx, dy = radius * np.cos(angles), radius_y * np.sin(angles)
    xs = np.round(cx + dx * np.cos(turn) - dy * np.sin(turn), COORD_DECIMALS)
    ys = np.round(cy + dx * np.sin(turn) + dy * np.cos(turn), COORD_DECIMALS)
    ring = tuple(zip(xs.tolist(), ys.tolist(), strict=True))
    inside = clip is None or (
        xs.min() >= clip[0] and ys.min() >= clip[1] and xs.max() <= clip[2] and ys.max() <= clip[3]
    )
    if inside and min(radius, radius_y) > 10.0**-COORD_DECIMALS * segments:
        return Shape(polygons=((ring,),))
    geometry = Polygon(ring)
    if clip is not None:
        geometry = shapely.intersection(geometry, shapely.box(*clip))
    return Shape.from_geometry(geometry)


def shape_from_mask(mask: np.ndarray) -> Shape | None:
    """The outline of a boolean mask's pixels as a shape (None for an empty mask), in image pixels.

    Pixel ``(row, col)`` covers ``[col, col + 1] x [row, row + 1]``; contours are traced with scikit-image's
    marching squares at level 0.5 (through the pixel edges, corners cut), holes and islands included
    (rings combined even-odd). Needs scikit-image: ``pip install 'medeyes[samples]'``.

    >>> mask = np.zeros((8, 8), bool); mask[2:6, 1:5] = True
    >>> shape = shape_from_mask(mask)
    >>> shape.bounds, shape.area  # a 4 x 4 square with its 4 corners cut by half a pixel
    ((1.0, 2.0, 5.0, 6.0), 15.5)
    """
    try:
        from skimage import measure
    except ImportError as exc:
        raise ImportError(
            "tracing mask outlines needs scikit-image: pip install 'medeyes[samples]' (or pip install scikit-image)"
        ) from exc
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D (rows, cols), got shape {mask.shape}")
    if not mask.any():
        return None
    padded = np.pad(mask, 1).astype(np.float32)  # closed contours also at the image edge
    rings = []
    for contour in measure.find_contours(padded, 0.5):
        # (row, col) of the padded array -> (x, y) of the image: minus the pad, plus half a pixel.
        ring = Polygon(np.column_stack((contour[:, 1] - 0.5, contour[:, 0] - 0.5)))
        if ring.is_valid and ring.area > 0.0:
            rings.append(ring)
        elif ring.area > 0.0:
            rings.append(shapely.make_valid(ring))
    combined = rings[0] if rings else Polygon()
    for ring in rings[1:]:
        combined = shapely.symmetric_difference(combined, ring)  # even-odd: a ring inside a ring is a hole
    try:
        return Shape.from_geometry(combined)
    except ValueError:
        return None  # only single pixels touching at corners: no area at level 0.5
