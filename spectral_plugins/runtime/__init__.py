"""The runtime: schedule snapshots during training (synchronous, background, distributed), run the
analyses on them and hand reports to publishers. Builds on the core, the lifecycle analytics and the
attention bounds; never imports a tracker."""
