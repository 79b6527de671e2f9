"""(placeholder: filled in by the layer family work)"""
