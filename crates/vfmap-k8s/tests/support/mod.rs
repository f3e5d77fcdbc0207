pub mod mem_pool;
