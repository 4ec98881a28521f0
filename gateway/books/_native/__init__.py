"""C sources of the native order books (books.c, books.h) and, once built, the cffi module
``_books`` (see gateway/books/native_build.py and gateway/books/native.py)."""
