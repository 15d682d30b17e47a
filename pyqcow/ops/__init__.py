"""Operations on whole images and chains (convert, compare, commit, stream, ...).

Each operation is planned as data (what to copy, how many bytes), then executed.
"""
