"""syncpro: publish builds and downloaded programs atomically into pending-release trees."""

__version__ = "0.1.0"
