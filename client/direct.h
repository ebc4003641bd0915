/* p11p client — the direct path (direct.c): once a session has made a few hot calls, it
 * asks the daemon to bind it (P11P_FN_DIRECT_BIND); from then on C_GenerateRandom,
 * C_SignInit and C_Sign go straight to the helper that holds its member session, one
 * socket hop instead of two, and the daemon keeps every other call. Whenever a direct
 * call cannot be answered there (the helper's answer is on the daemon's fallback list,
 * the connection breaks, the call times out) the session is unbound
 * (P11P_FN_DIRECT_UNBIND) and the call goes through the daemon, after the operation's
 * init again when one was running. The generated stubs of the wrapped functions
 * (p11p_wire_*) are the way to the daemon. protocol/README.md, "Direct path". */
#ifndef P11P_DIRECT_H
#define P11P_DIRECT_H

#include "p11p-extra.h"

/* p11p's own function codes:
 * [1002, session] -> [rv, [name, token, id, timeout_ms, slot, [rv...]]]
 * [1003, session, object] -> [rv, member handle]
 * [1004, session, why] -> [rv] */
#define P11P_FN_DIRECT_BIND 1002
#define P11P_FN_DIRECT_KEY 1003
#define P11P_FN_DIRECT_UNBIND 1004

CK_RV p11p_wire_C_GenerateRandom(CK_SESSION_HANDLE hSession, CK_BYTE_PTR RandomData,
				 CK_ULONG ulRandomLen);
CK_RV p11p_wire_C_SignInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
			   CK_OBJECT_HANDLE hKey);
CK_RV p11p_wire_C_Sign(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
		       CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen);
CK_RV p11p_wire_C_SignUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen);
CK_RV p11p_wire_C_SignFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature,
			    CK_ULONG_PTR pulSignatureLen);
CK_RV p11p_wire_C_CloseSession(CK_SESSION_HANDLE hSession);
CK_RV p11p_wire_C_CloseAllSessions(CK_SLOT_ID slotID);
CK_RV p11p_wire_C_DestroyObject(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject);

/* Reads P11P_DIRECT (0: never bind) at C_Initialize. */
void p11p_direct_setup(void);
/* Forgets every binding and closes every direct connection (C_Initialize, C_Finalize,
 * a forked child). Called with no call in flight, or in the child after fork(). */
void p11p_direct_reset(void);

#endif
