"""Generated gRPC code for proto/ (make proto = `python -m service.gen`); do not edit by hand."""
