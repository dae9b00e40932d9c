"""The wide-vocabulary world's task: long graph walks with free choices (`task`).

Its models use the real Qwen3 tokenizer (`asyncopd.models.qwen_tokenizer`) and Qwen3's
151,936-row embedding; this package knows strings only and imports nothing else of the project.
"""
