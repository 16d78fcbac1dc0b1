"""Generated from proto/wattserve/v1/wattserve.proto by codegen.py."""
