"""What runs inside a Ray Serve replica: the transformers app (`app`), the vLLM app's ingress
(`vllm_ingress`), the OpenAI wire format (`openai_api`), metric recording (`metrics`) and the
LLM-aware autoscaling policy (`autoscaling_policy`). Nothing here imports the notebook side
(`cluster`, `widgets`, `notebooks`); an import-linter contract keeps it so."""
