//! Tests of the cache as a whole; the stores test themselves beside their code.

mod basics;
mod concurrency;
mod crash_model;
mod failures;
mod model;
mod pressure;
mod support;
