"""starchat-lsp: StarChat-beta on your own GPU, behind your editor, over LSP."""

__version__ = "0.1.0"
