"""hms-sync: keeps orders in HMS-API and HMS-OMS in step."""

__version__ = "0.1.0"
