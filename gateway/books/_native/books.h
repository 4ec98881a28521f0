/* Native order books: a book per (instrument_id, publisher_id) built from DBN v3 MBO records,
 * one call per chunk, with the derived trades / mbp-1 / mbp-10 records built while applying.
 * Rules: gateway/books/reference.py (the oracle); records: notes/design17.md. */
#ifndef GATEWAY_NATIVE_BOOKS_H
#define GATEWAY_NATIVE_BOOKS_H

#include <stddef.h>
#include <stdint.h>

#define NB_WANT_MBP1 1
#define NB_WANT_MBP10 2
#define NB_WANT_TRADES 4

/* nb_result.error */
#define NB_OK 0
#define NB_ERR_SHORT 1   /* a record's length byte says fewer than 16 bytes (a header) */
#define NB_ERR_OVERRUN 2 /* a record runs past the end of the chunk */
#define NB_ERR_NOMEM 3   /* out of memory: the walk stopped before the record at `consumed` */

typedef struct nb_engine nb_engine;

typedef struct {
    const uint8_t *mbp1;
    size_t mbp1_len;
    uint64_t mbp1_count;
    const uint8_t *mbp10;
    size_t mbp10_len;
    uint64_t mbp10_count;
    const uint8_t *trades;
    size_t trades_len;
    uint64_t trades_count;
    size_t consumed; /* bytes of whole records walked */
    int error;
} nb_result;

typedef struct {
    uint64_t books;
    uint64_t orders; /* resting orders, top-of-book (F_TOB) orders included */
    uint64_t levels;
    uint64_t memory_bytes;
    uint64_t records_applied;
    uint64_t unknown_cancels;
} nb_stats;

typedef struct {
    uint64_t order_id;
    int64_t price;
    uint64_t ts_event;
    uint32_t size;
    uint32_t sequence;
    char side;
} nb_order_out;

typedef struct {
    int64_t price;
    uint64_t size;
    uint32_t count; /* orders, a top-of-book (F_TOB) order left out */
} nb_level_out;

nb_engine *nb_new(void);
void nb_free(nb_engine *e);
int nb_apply(nb_engine *e, const uint8_t *data, size_t n, int want, nb_result *out);
int nb_snapshot(nb_engine *e, const uint32_t *iids, size_t n_iids, int all, uint64_t ts_recv,
                const uint8_t **out, size_t *out_len, uint64_t *count);
void nb_get_stats(const nb_engine *e, nb_stats *out);
size_t nb_levels(const nb_engine *e, uint32_t iid, uint16_t pub, char side, size_t depth,
                 nb_level_out *out);
size_t nb_order_count(const nb_engine *e, uint32_t iid, uint16_t pub);
size_t nb_orders(const nb_engine *e, uint32_t iid, uint16_t pub, nb_order_out *out, size_t cap);

#endif
