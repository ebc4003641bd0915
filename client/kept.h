/* p11p client — what the library keeps for a daemon that loses its application's state
 * (link feature resume; daemon/resume.py): the state file's key the daemon gave in its
 * hello answer, and the logins this application made (slot, user type, PIN), following
 * C_Login, C_SetPIN, C_Logout and the close of a token's last session. They live in
 * memory locked out of swap and left out of core dumps and forked children, and are
 * wiped at C_Finalize. Every hello made once a key is kept carries them ("resume"); a
 * daemon uses them only for a context it could not take back from its helpers.
 * Callers must not hold the library's lock: these take it. */
#ifndef P11P_KEPT_H
#define P11P_KEPT_H

#include <msgpack.h>

#include "p11p-extra.h"

#define P11P_KEY_SIZE 32
#define P11P_PIN_MAX 256

void p11p_kept_key(const unsigned char key[P11P_KEY_SIZE]);
void p11p_kept_login(CK_SLOT_ID slot, CK_USER_TYPE user, const CK_UTF8CHAR *pin, CK_ULONG len);
/* C_SetPIN succeeded on a session of `slot`: its kept login takes the new PIN. */
void p11p_kept_set_pin(CK_SLOT_ID slot, const CK_UTF8CHAR *pin, CK_ULONG len);
/* Logged out of `slot` (C_Logout, its last session closed). */
void p11p_kept_logout(CK_SLOT_ID slot);
/* Everything goes (C_Finalize); nolock: in a forked child, which has one thread. */
void p11p_kept_wipe(int nolock);
/* Packs the hello's "resume" key and value when a key is kept: 1 packed, 0 nothing
 * kept, -1 out of memory. The caller wipes the buffer it packed into. */
int p11p_kept_pack(msgpack_packer *pk);

#endif
