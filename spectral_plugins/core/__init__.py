"""The core: find every weight matrix of a model (map, roles, keys), compute its spectrum (engine) and
the per-matrix metrics, and hold the result (snapshot). Imports nothing else of the package and no
tracker."""
