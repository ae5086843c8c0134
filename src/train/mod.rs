//! Training, written once over `B: TrainBackend` (llm.c's train_gpt2.c in shape): lora (the
//! adapters), step (forward keeping what backward needs, loss, backward, optimizer), optim
//! (AdamW state, schedules, clipping), plan (a step's device memory, checked before it runs);
//! merge (a PEFT adapter into its base model) and export (a fully fine-tuned model as an HF
//! folder) write through the convert pipeline.

pub mod adapter;
pub mod checkpoint;
pub mod data;
pub mod export;
pub mod log;
pub mod lora;
pub mod merge;
pub mod optim;
pub mod params;
pub mod peft;
pub mod plan;
pub mod plot;
pub mod run;
pub mod step;
