"""What a job asks for, checked: the request layer. It imports nothing of the project but `pipelines.errors`.

- `fields`: the field spec (`spec(...)`: range, choices, help, metadata key, stage-1 relevance) and its readers;
- `schema`: the request dataclasses (`GenerationRequest`, its nested configs, `UpscaleRequest`) and the flat view;
- `checks`: value checks (`Limits`, numbers, names, text, CFG schedules, AND parts);
- `validation`: a whole request checked against the schema and the limits (checks that need weights or pixels run
  in `Engine.check`);
- `regions`: the regional-prompt table;
- `presets`: the preset files as partial requests.
"""
