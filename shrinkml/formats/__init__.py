"""File formats shrinkml writes for other runtimes: llama.cpp's GGUF block formats
(``gguf_blocks``) and GGUF files (``gguf_file``), in numpy."""
