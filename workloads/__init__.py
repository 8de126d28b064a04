"""Programs that use the NPU the way users do: the model described as data and its pyACL executor."""
