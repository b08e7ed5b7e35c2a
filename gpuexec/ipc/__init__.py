"""The wire: message types, the codec, private endpoints."""
