//! dma-example
