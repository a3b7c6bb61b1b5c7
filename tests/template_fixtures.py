"""Chat templates written for these tests that behave as real checkpoints' templates do, each
in the one way alignflow must handle (models/chat.py). None is a copy of a real template.

- QWEN3_LIKE: ChatML whose last reply shows its `<think>` block and earlier replies drop it.
- GPT_OSS_LIKE: channel headers; the last reply ends `<|return|>`, earlier ones `<|end|>`.
- PHI35_LIKE: role tags, `<|end|>` closes a turn and `<|endoftext|>` (EOS) follows the whole
  conversation only (use with the "neox" fixture, whose generation_config stops on both).
- MISTRAL_LIKE: `[INST]` turns, the system prompt written into the last user turn.
- GEMMA_LIKE: raises on a system message; roles must alternate.
- R1_LIKE / R1_FIRST_LIKE: replies lose everything up to `</think>`; R1_LIKE's generation prompt
  also opens `<think>\\n`, which the reply's rendering never writes.
- R1_TRAINING: the worked example of docs/chat-templates.md, a training template for R1_LIKE.

Templates on the ChatML tokens take the "chatml" fixture's tokenizer (`<|im_start|>`,
`<|im_end|>`, `<|endoftext|>`); GPT_OSS_LIKE needs `GPT_OSS_TOKENS` added."""

QWEN3_LIKE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}"
    "{%- set answer = m['content'].split('</think>')[-1].lstrip('\n') %}"
    "{%- set thought = m['content'].split('</think>')[0].split('<think>')[-1].strip('\n')"
    " if '</think>' in m['content'] else '' %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- if loop.index0 > ns.last_user %}{{- '<think>\n' + thought + '\n</think>\n\n' }}{%- endif %}"
    "{{- answer + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

GPT_OSS_TOKENS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>"]
GPT_OSS_LIKE = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + m['content'] }}"
    "{{- '<|return|>' if loop.last else '<|end|>' }}"
    "{%- else %}{{- '<|start|>' + m['role'] + '<|message|>' + m['content'] + '<|end|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)

PHI35_LIKE = (
    "{%- for m in messages %}{{- '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- else %}{{- eos_token }}{%- endif %}"
)

MISTRAL_LIKE = (
    "{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{%- set turns = messages[1:] if system else messages %}"
    "{%- set last_user = namespace(i=-1) %}"
    "{%- for m in turns %}{%- if m['role'] == 'user' %}{%- set last_user.i = loop.index0 %}{%- endif %}{%- endfor %}"
    "{{- '<|endoftext|>' }}"
    "{%- for m in turns %}"
    "{%- if m['role'] == 'user' %}"
    "{{- '[INST] ' + (system + '\n\n' if system and loop.index0 == last_user.i else '') + m['content'] + ' [/INST]' }}"
    "{%- else %}{{- m['content'] + '<|im_end|>' }}{%- endif %}"
    "{%- endfor %}"
)

GEMMA_LIKE = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{%- endif %}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{{- '<|im_start|>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' + m['content'] | trim"
    " + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>model\n' }}{%- endif %}"
)

_R1_BODY = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' + m['content'].split('</think>')[-1].lstrip() + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
)
R1_LIKE = _R1_BODY + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n<think>\n' }}{%- endif %}"
R1_FIRST_LIKE = _R1_BODY + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"

# The training template for R1_LIKE: replies rendered whole (reasoning included), and a generation
# prompt they continue. At inference the shipped template's prompt adds "<think>\n", which is how
# every trained reply begins.
R1_TRAINING = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
