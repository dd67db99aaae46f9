"""visionroute."""
