"""The code written into every converted checkpoint (shipped as meft_convert.templates).

Each module here must run with only torch, transformers and the standard library (numpy only when a
conversion draws adapters), and must
reach its siblings through relative imports: transformers copies exactly these files into a
checkpoint's folder and loads them with trust_remote_code. The two tables the converter reads
without torch, meft_table.py and families.py, import only the standard library.
"""
